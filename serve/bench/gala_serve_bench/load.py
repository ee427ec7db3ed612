"""Closed-loop load: the request bodies each protocol sends, one client a connection, and N of
them back to back in threads (in one or more processes) for a fixed time."""

from __future__ import annotations

import json
import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass
class Target:
    name: str
    kind: str  # json | binary | grpc
    port: int


def inputs(shape: tuple[int, ...], batch: int) -> np.ndarray:
    """``batch`` samples of ``shape``, the same every call (seeded)."""
    return np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)


def request(kind: str, shape: tuple[int, ...], rows: int = 1):
    """What one client sends: (body, headers) over HTTP, a ModelInferRequest over gRPC."""
    x = inputs(shape, rows)
    spec = {"name": "input", "shape": [rows, *shape], "datatype": "FP32"}
    if kind == "grpc":
        from tritonclient.grpc import service_pb2 as pb

        infer = pb.ModelInferRequest(model_name="gala")
        infer.inputs.add(name="input", datatype="FP32", shape=[rows, *shape])
        infer.outputs.add(name="probabilities")
        infer.raw_input_contents.append(x.tobytes())
        return infer
    if kind == "json":
        doc = {"inputs": [{**spec, "data": x.ravel().tolist()}]}
        doc["outputs"] = [{"name": "probabilities"}]
        return json.dumps(doc).encode(), {"Content-Type": "application/json"}
    doc = {
        "inputs": [{**spec, "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    header = json.dumps(doc).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _client(target: Target, shape: tuple[int, ...]):
    """A no-argument call sending one request to ``target`` on a connection of its own."""
    if target.kind == "grpc":
        import grpc
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        infer = request("grpc", shape)
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{target.port}"))
        return lambda: stub.ModelInfer(infer, timeout=30)
    body, headers = request(target.kind, shape)
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{target.port}",
        timeout=30,
        transport=httpx.HTTPTransport(socket_options=NODELAY),
    )

    def call() -> None:
        response = http.post("/v2/models/gala/infer", content=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{target.name}: HTTP {response.status_code} {response.text[:200]}")

    return call


def _load_threads(
    target: Target, shape: tuple[int, ...], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    calls = [_client(target, shape) for _ in range(concurrency)]
    for call in calls:
        call()  # connect and warm up outside the timed window
    latencies: list[float] = []
    lock, deadline = threading.Lock(), time.perf_counter() + seconds

    def worker(call) -> None:
        mine = []
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            call()
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in calls]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - begin


def load(target: Target, shape: tuple[int, ...], concurrency: int, seconds: float, procs: int):
    """Closed-loop load: (latencies, seconds) of ``concurrency`` clients for ``seconds``."""
    procs = max(1, min(procs, concurrency))
    if procs == 1:
        return _load_threads(target, shape, concurrency, seconds)
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.starmap(_load_threads, [(target, shape, n, seconds) for n in shares])
    return [x for part, _ in parts for x in part], max(e for _, e in parts)


def summary(latencies: list[float], seconds: float) -> dict:
    """Requests/s, median and 99th percentile latency (ms), and the request count."""
    q = np.quantile(latencies, [0.5, 0.99])
    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
        "requests": len(latencies),
    }
