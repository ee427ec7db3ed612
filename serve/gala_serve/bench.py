"""Benchmark the server: dynamic batching vs none, latency, memory, ORT vs torch, gala-batch.

    python -m gala_serve.bench --artifact DIR [--seconds 4] [--shards DIR]

Two servers run side by side (``--max-batch 64`` and ``--max-batch 1``); at concurrency 1, 8
and 32 the client threads send one-sample binary infer requests for ``--seconds`` each,
alternating between the servers. Reported: requests/s, p50/p99 latency, the ratio at each level
and each server's peak RSS. With torch and gala_scale importable, ONNX Runtime vs torch eager
inference of the same weights on the CPU (batch 1 and 64) is timed too; with ``--shards``,
gala-batch images/s end to end. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _server(artifact: Path, port: int, max_batch: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "gala-serve"
    return subprocess.Popen(
        [
            str(exe),
            "--artifact",
            str(artifact),
            "--port",
            str(port),
            "--max-batch",
            str(max_batch),
            "--max-delay-ms",
            "5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(shape: tuple[int, ...]) -> tuple[bytes, dict]:
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
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


def load(url: str, shape: tuple[int, ...], concurrency: int, seconds: float) -> dict:
    """Closed-loop load: ``concurrency`` threads send one-sample requests back to back."""
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
    elapsed = time.perf_counter() - begin
    q = np.quantile(latencies, [0.5, 0.99])
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
        "requests": len(latencies),
    }


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ort_vs_torch(artifact: Path, repeats: int = 20) -> dict | None:
    """ONNX Runtime vs torch eager on the CPU, same weights; None without torch/gala_scale."""
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
    session = ort.InferenceSession(str(artifact / doc["onnx"]), providers=["CPUExecutionProvider"])
    result = {}
    for batch in (1, 64):
        x = (
            np.random.default_rng(0)
            .normal(size=(batch, *doc["input"]["shape"][1:]))
            .astype(np.float32)
        )
        tx = torch.from_numpy(x)
        times: dict[str, list[float]] = {"ort": [], "torch": []}
        with torch.no_grad():
            for i in range(repeats + 2):
                for name in ("ort", "torch") if i % 2 == 0 else ("torch", "ort"):
                    start = time.perf_counter()
                    session.run(None, {"input": x}) if name == "ort" else model(tx)
                    if i >= 2:
                        times[name].append(time.perf_counter() - start)
        o, t = statistics.median(times["ort"]), statistics.median(times["torch"])
        result[f"batch{batch}"] = {"ort_ms": 1000 * o, "torch_ms": 1000 * t, "ort_speedup": t / o}
    return result


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
    args = p.parse_args(argv)
    shape = tuple(json.loads((args.artifact / "artifact.json").read_text())["input"]["shape"][1:])
    ports = {"dynamic": _free_port(), "max_batch_1": _free_port()}
    servers = {
        "dynamic": _server(args.artifact, ports["dynamic"], 64),
        "max_batch_1": _server(args.artifact, ports["max_batch_1"], 1),
    }
    try:
        for port in ports.values():
            Client(f"http://127.0.0.1:{port}").wait_ready(120)
        result: dict = {
            "benchmark": "serve",
            "artifact": str(args.artifact),
            "cpu_count": os.cpu_count(),
            "levels": {},
        }
        for level in LEVELS:
            row = {}
            for name in ("dynamic", "max_batch_1") if level % 2 else ("max_batch_1", "dynamic"):
                row[name] = load(f"http://127.0.0.1:{ports[name]}", shape, level, args.seconds)
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
    result["ort_vs_torch_cpu"] = ort_vs_torch(args.artifact)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
