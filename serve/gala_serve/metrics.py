"""The server's Prometheus metrics, kept and rendered by ``prometheus_client``.

One registry a server (not the library's global one), so two servers in one process, as in the
tests, do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "gala_requests",
            "requests by endpoint and protocol",
            ["endpoint", "protocol"],
            registry=r,
        )
        self.errors = Counter(
            "gala_request_errors",
            "requests answered with an error, by HTTP status or gRPC code",
            ["endpoint", "protocol", "code"],
            registry=r,
        )
        self.images = Counter("gala_images", "images and samples inferred", registry=r)
        self.latency = Histogram(
            "gala_request_latency_seconds",
            "request latency by endpoint and protocol",
            ["endpoint", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gala_batch_size", "samples per ONNX Runtime call", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "gala_inference_seconds",
            "ONNX Runtime time per call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.provider = Gauge(
            "gala_serve_provider",
            "1 for the execution provider serving the model; fallback=true when auto asked for "
            "CUDA and it did not start",
            ["provider", "requested", "fallback"],
            registry=r,
        )
        self.timeouts = Counter(
            "gala_request_timeouts",
            "connections cut because a request's head or body did not arrive in time",
            registry=r,
        )
        self.batch_failures = Counter(
            "gala_batch_failures",
            "batches the batcher could not compute, by stage (their requests got a 500)",
            ["stage"],
            registry=r,
        )
        self.queued = Gauge(
            "gala_queue_samples",
            "samples waiting for the model (bounded by --max-queue)",
            registry=r,
        )

    def request(self, endpoint: str, protocol: str, seconds: float, code: str | None) -> None:
        self.requests.labels(endpoint, protocol).inc()
        self.latency.labels(endpoint, protocol).observe(seconds)
        if code is not None:
            self.errors.labels(endpoint, protocol, code).inc()

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def batch_failure(self, stage: str) -> None:
        self.batch_failures.labels(stage).inc()

    def watch_queue(self, samples) -> None:
        """Read the queue's depth from ``samples()`` at each scrape."""
        self.queued.set_function(samples)

    def render(self) -> bytes:
        return generate_latest(self.registry)
