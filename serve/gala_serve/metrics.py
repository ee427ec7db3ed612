"""Prometheus text-format metrics: counters, gauges and histograms, thread-safe, no dependencies."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.histograms: dict[tuple[str, tuple], tuple[tuple, dict]] = {}
        self.help = {
            "gala_requests_total": ("counter", "HTTP requests by endpoint"),
            "gala_request_errors_total": ("counter", "HTTP requests answered with an error"),
            "gala_images_total": ("counter", "images and samples inferred"),
            "gala_request_latency_seconds": ("histogram", "request latency by endpoint"),
            "gala_batch_size": ("histogram", "samples per ONNX Runtime call"),
            "gala_inference_seconds": ("histogram", "ONNX Runtime time per call"),
            "gala_serve_provider": (
                "gauge",
                "1 for the execution provider serving the model; fallback=true when auto asked "
                "for CUDA and it did not start",
            ),
        }

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self.lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self.lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    def observe(
        self, name: str, value: float, buckets: tuple = LATENCY_BUCKETS, **labels: str
    ) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            if key not in self.histograms:
                self.histograms[key] = (buckets, {"counts": [0] * len(buckets), "sum": 0.0, "n": 0})
            bounds, state = self.histograms[key]
            for i, bound in enumerate(bounds):
                if value <= bound:
                    state["counts"][i] += 1
            state["sum"] += value
            state["n"] += 1

    @staticmethod
    def _labels(pairs) -> str:
        return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else ""

    def render(self) -> str:
        lines, seen = [], set()
        with self.lock:
            for (name, labels), value in [
                *sorted(self.counters.items()),
                *sorted(self.gauges.items()),
            ]:
                if name not in seen:
                    seen.add(name)
                    kind, text = self.help[name]
                    lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                lines.append(f"{name}{self._labels(labels)} {value:g}")
            for (name, label_pairs), (bounds, state) in sorted(self.histograms.items()):
                labels = list(label_pairs)
                if name not in seen:
                    seen.add(name)
                    kind, text = self.help[name]
                    lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for bound, count in zip(bounds, state["counts"], strict=True):
                    lines.append(
                        f"{name}_bucket{self._labels([*labels, ('le', f'{bound:g}')])} {count}"
                    )
                lines.append(f"{name}_bucket{self._labels([*labels, ('le', '+Inf')])} {state['n']}")
                lines.append(f"{name}_sum{self._labels(labels)} {state['sum']:g}")
                lines.append(f"{name}_count{self._labels(labels)} {state['n']}")
        return "\n".join(lines) + "\n"
