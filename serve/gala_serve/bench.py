"""Benchmark the server: dynamic batching vs none, latency, memory, ORT vs torch, gala-batch.

    python -m gala_serve.bench --artifact DIR [--seconds 4] [--shards DIR] [--providers auto]

Two servers run side by side (``--max-batch 64`` and ``--max-batch 1``); at concurrency 1, 8
and 32 the clients send one-sample binary infer requests for ``--seconds`` each, alternating
between the servers. The clients are threads in ``--client-procs`` processes (by default one
per 4 cores, so that on a large machine the load generator's GIL is not what is measured).
Reported: requests/s, p50/p99 latency, the ratio at each level, each server's peak RSS and
provider, and the model alone in process (ms a sample at batch 1 and 64 on the same provider):
when the model is the bottleneck, batching cannot raise throughput by more than that gain.
With torch and gala_scale importable, ONNX Runtime vs torch eager on the same weights (on the
GPU too when both have CUDA); with ``--shards``, gala-batch images/s end to end. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gala_serve.client import Client

LEVELS = (1, 8, 32)


def _server(
    artifact: Path, port: int, max_batch: int, providers: str, log: Path
) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [
                sys.executable,  # not the gala-serve script: works from a plain PYTHONPATH too
                "-m",
                "gala_serve.app",
                "--artifact",
                str(artifact),
                "--port",
                str(port),
                "--max-batch",
                str(max_batch),
                "--max-delay-ms",
                "5",
                "--providers",
                providers,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(server: subprocess.Popen, port: int, log: Path) -> None:
    client = Client(f"http://127.0.0.1:{port}", retries=0)
    try:
        client.wait_ready(120, alive=lambda: server.poll() is None)
    except (TimeoutError, RuntimeError) as err:
        raise RuntimeError(
            f"gala-serve on port {port} did not get ready:\n{log.read_text()}"
        ) from err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)


def _body(shape: tuple[int, ...]) -> tuple[bytes, dict]:
    x = _inputs(shape, 1)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, *shape],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def load(
    url: str, shape: tuple[int, ...], concurrency: int, seconds: float, procs: int = 1
) -> dict:
    """Closed-loop load: ``concurrency`` clients send one-sample requests back to back."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    if procs == 1:
        latencies, elapsed = _load_threads(url, shape, concurrency, seconds)
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            parts = pool.starmap(_load_threads, [(url, shape, n, seconds) for n in shares])
        latencies = [x for part, _ in parts for x in part]
        elapsed = max(e for _, e in parts)
    q = np.quantile(latencies, [0.5, 0.99])
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
        "requests": len(latencies),
    }


def _load_threads(
    url: str, shape: tuple[int, ...], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    client, (body, headers) = Client(url, retries=0), _body(shape)
    latencies: list[float] = []
    lock, deadline = threading.Lock(), time.perf_counter() + seconds

    def worker() -> None:
        mine = []
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            status, _, _ = client.request("POST", "/v2/models/gala/infer", body, headers)
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - begin


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _medians(calls: dict, repeats: int) -> dict[str, float]:
    """Median ms of each no-argument call, run interleaved (order flipped every round)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats + 2):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def model_alone(artifact: Path, providers: str, repeats: int = 20) -> dict:
    """The server's ONNX Runtime session without HTTP: ms a sample at batch 1 and 64."""
    from gala_serve.model import Model

    model = Model(artifact, providers)
    x1, x64 = _inputs(model.input_shape, 1), _inputs(model.input_shape, 64)
    ms = _medians({"1": lambda: model.outputs(x1), "64": lambda: model.outputs(x64)}, repeats)
    return {
        "provider": model.provider,
        "batch1_ms_per_sample": ms["1"],
        "batch64_ms_per_sample": ms["64"] / 64,
        "batch_gain": ms["1"] / (ms["64"] / 64),
    }


def ort_vs_torch(artifact: Path, device: str, repeats: int = 20) -> dict | None:
    """ONNX Runtime vs torch eager, same weights, host arrays in and out; None without torch."""
    try:
        import torch
        from safetensors.torch import load_file

        from gala_scale.models import create_model
    except ImportError:
        return None
    import onnxruntime as ort

    doc = json.loads((artifact / "artifact.json").read_text())
    source = Path(doc["source"]["run"]) / (
        "best" if doc["source"]["checkpoint"] == "best" else "final"
    )
    model = create_model(doc["architecture"], num_classes=doc["num_classes"]).eval()
    model.load_state_dict(load_file(source / "model.safetensors"))
    model.to(device)
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    session = ort.InferenceSession(str(artifact / doc["onnx"]), providers=[provider])

    def eager(tx: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(tx.to(device)).cpu().numpy()  # .cpu() waits for the GPU

    result = {}
    for batch in (1, 64):
        x = _inputs(tuple(doc["input"]["shape"][1:]), batch)
        tx = torch.from_numpy(x)
        ms = _medians(
            {"ort": lambda x=x: session.run(None, {"input": x}), "torch": lambda tx=tx: eager(tx)},
            repeats,
        )
        result[f"batch{batch}"] = {
            "ort_ms": ms["ort"],
            "torch_ms": ms["torch"],
            "ort_speedup": ms["torch"] / ms["ort"],
        }
    return result


def _cuda_for_torch() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def batch_throughput(url: str, shards: Path) -> dict:
    from gala_serve.batch import main as batch_main

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        batch_main(
            [
                "--server",
                url,
                "--input",
                str(shards),
                "--out",
                f"{tmp}/p.jsonl",
                "--concurrency",
                "8",
            ]
        )
        seconds = time.perf_counter() - start
        images = len(Path(f"{tmp}/p.jsonl").read_text().splitlines())
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gala_serve.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=4.0, help="load per level and server")
    p.add_argument(
        "--shards", type=Path, help="also time gala-batch on this shard set's test split"
    )
    p.add_argument("--providers", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrencies")
    p.add_argument(
        "--client-procs",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 4),
        help="load-generator processes (default: one per 4 cores)",
    )
    args = p.parse_args(argv)
    shape = tuple(json.loads((args.artifact / "artifact.json").read_text())["input"]["shape"][1:])
    ports = {"dynamic": _free_port(), "max_batch_1": _free_port()}
    logs = Path(tempfile.mkdtemp(prefix="gala-serve-bench-"))
    servers = {
        name: _server(args.artifact, ports[name], size, args.providers, logs / f"{name}.log")
        for name, size in (("dynamic", 64), ("max_batch_1", 1))
    }
    try:
        for name, port in ports.items():
            _wait_ready(servers[name], port, logs / f"{name}.log")
        meta = Client(f"http://127.0.0.1:{ports['dynamic']}").json("GET", "/v2/models/gala")
        result: dict = {
            "benchmark": "serve",
            "artifact": str(args.artifact),
            "cpu_count": os.cpu_count(),
            "client_procs": args.client_procs,
            "provider": meta["parameters"]["provider"],
            "levels": {},
        }
        for i, level in enumerate(args.levels):
            row = {}
            for name in ("dynamic", "max_batch_1") if i % 2 == 0 else ("max_batch_1", "dynamic"):
                url = f"http://127.0.0.1:{ports[name]}"
                row[name] = load(url, shape, level, args.seconds, args.client_procs)
                print(f"concurrency {level}, {name}: {row[name]}", flush=True)
            row["throughput_ratio"] = (
                row["dynamic"]["requests_per_s"] / row["max_batch_1"]["requests_per_s"]
            )
            row["p99_ratio"] = row["dynamic"]["p99_ms"] / row["max_batch_1"]["p99_ms"]
            result["levels"][str(level)] = row
        result["peak_rss_mib"] = {n: _peak_rss_mib(s.pid) for n, s in servers.items()}
        if args.shards:
            result["gala_batch"] = batch_throughput(
                f"http://127.0.0.1:{ports['dynamic']}", args.shards
            )
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(10)
        shutil.rmtree(logs, ignore_errors=True)
    result["model_alone"] = model_alone(args.artifact, args.providers)
    result["ort_vs_torch_cpu"] = ort_vs_torch(args.artifact, "cpu")
    if result["provider"] == "CUDAExecutionProvider" and _cuda_for_torch():
        result["ort_vs_torch_cuda"] = ort_vs_torch(args.artifact, "cuda")
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
