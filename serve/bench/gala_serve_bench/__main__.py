"""Benchmark the server against a peer: protocols, dynamic batching, latency, memory, ORT vs torch.

    python -m gala_serve_bench --artifact DIR [--seconds 3] [--rounds 3] [--levels 1 8 32]
                               [--peer-python tools/.mlserver/bin/python] [--shards DIR]

Servers, all on the same artifact and all up at once: gala-serve with dynamic batching
(``--max-batch 64 --max-delay-ms 5``, HTTP and gRPC), gala-serve with ``--max-batch 1``, and,
with ``--peer-python`` (a venv made by tools/mlserver_venv.sh), the peer: MLServer 1.7.1 serving
the same ONNX graph through tools/mlserver_peer/, with adaptive batching (max batch 64, 5 ms)
and without. Targets, each a closed loop of N clients sending one-sample infer requests back to
back (one output, ``probabilities``):

- ``gala_json``, ``peer_adaptive``, ``peer``: the same Open Inference Protocol JSON body, sent by
  the same client code (httpx, a keep-alive connection a client);
- ``gala_binary``, ``gala_max_batch_1``: the binary tensor data extension;
- ``gala_grpc``: gRPC ``ModelInfer`` with raw contents.

At each concurrency the targets run ``--rounds`` times for ``--seconds`` each, interleaved (the
order rotates each round); requests/s and latency quantiles are over all rounds. The clients are
threads in ``--client-procs`` processes (one per 4 cores by default). Also: each server's peak
RSS, the model alone in process (ms a sample at batch 1 and 64), ONNX Runtime vs torch eager
when torch is importable, and with ``--shards`` gala-batch images/s. The last line is one JSON
object, with ``json_over_peer`` and ``binary_over_peer`` (against the peer's better mode) and
``dynamic_over_max_batch_1`` per concurrency.

``--flood`` measures overload instead: one gala-serve with a small queue (``--max-queue``), and
``--concurrency`` clients on one event loop sending ``--requests`` binary infer requests of
``--rows`` samples back to back, with nothing held back. Every answer must be a 200 or a 503
(with ``Retry-After``); the JSON line gives the count of each status, the 503 share, latency
quantiles under the flood, and how long one plain request takes right after it.

    python -m gala_serve_bench --artifact DIR --flood [--concurrency 64] [--requests 5000]
                               [--rows 16] [--max-queue 64] [--flood-max-batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gala_serve.client import Client

from gala_serve_bench import flood, inprocess, servers
from gala_serve_bench.load import Target, load, summary

LEVELS = (1, 8, 32)
PEERS = ("peer_adaptive", "peer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gala_serve_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=3.0, help="load per round, level and target")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level")
    p.add_argument(
        "--shards", type=Path, help="also time gala-batch on this shard set's test split"
    )
    p.add_argument("--providers", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrencies")
    p.add_argument(
        "--peer-python",
        help="the python of an MLServer venv (tools/mlserver_venv.sh): adds the peer",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 4),
        help="load-generator processes (default: one per 4 cores)",
    )
    p.add_argument("--flood", action="store_true", help="measure overload instead (see above)")
    p.add_argument("--concurrency", type=int, default=64, help="--flood: clients at once")
    p.add_argument("--requests", type=int, default=5000, help="--flood: requests in all")
    p.add_argument("--rows", type=int, default=16, help="--flood: samples a request")
    p.add_argument("--max-queue", type=int, default=64, help="--flood: the server's queue")
    p.add_argument("--flood-max-batch", type=int, default=16, help="--flood: the server's")
    return p.parse_args(argv)


def _start(args: argparse.Namespace, logs: Path) -> dict[str, tuple]:
    """Every server of the comparison, by name: (process, HTTP port, gRPC port or None)."""
    started = {
        "dynamic": servers.gala(args.artifact, 64, args.providers, logs / "dynamic.log"),
        "max_batch_1": servers.gala(args.artifact, 1, args.providers, logs / "max_batch_1.log"),
    }
    if args.peer_python:
        for name, batching in (("peer_adaptive", True), ("peer", False)):
            started[name] = servers.peer(
                args.peer_python, args.artifact, batching, logs / name, logs / f"{name}.log"
            )
    return started


def _targets(started: dict[str, tuple]) -> list[Target]:
    dynamic, single = started["dynamic"], started["max_batch_1"]
    targets = [
        Target("gala_json", "json", dynamic[1]),
        Target("gala_binary", "binary", dynamic[1]),
        Target("gala_grpc", "grpc", dynamic[2]),
        Target("gala_max_batch_1", "binary", single[1]),
    ]
    return targets + [Target(n, "json", started[n][1]) for n in PEERS if n in started]


def _level(args, targets: list[Target], shape: tuple[int, ...], level: int) -> dict:
    """Every target at one concurrency, ``--rounds`` times interleaved: a row of the report."""
    samples = {t.name: ([], 0.0) for t in targets}
    for r in range(args.rounds):
        k = r % len(targets)
        for target in targets[k:] + targets[:k]:
            lat, sec = load(target, shape, level, args.seconds, args.client_procs)
            samples[target.name] = (samples[target.name][0] + lat, samples[target.name][1] + sec)
    row = {name: summary(*sample) for name, sample in samples.items()}
    for name, stats in row.items():
        print(f"concurrency {level}, {name}: {stats}", flush=True)
    rps = {name: stats["requests_per_s"] for name, stats in row.items()}
    row["dynamic_over_max_batch_1"] = {
        "throughput": rps["gala_binary"] / rps["gala_max_batch_1"],
        "p99": row["gala_binary"]["p99_ms"] / row["gala_max_batch_1"]["p99_ms"],
    }
    peers = [rps[n] for n in PEERS if n in rps]
    if peers:
        row["json_over_peer"] = rps["gala_json"] / max(peers)
        row["binary_over_peer"] = rps["gala_binary"] / max(peers)
    return row


def compare(args: argparse.Namespace, shape: tuple[int, ...]) -> dict:
    """The servers under load at each concurrency, then the in-process timings: the report."""
    logs = Path(tempfile.mkdtemp(prefix="gala-serve-bench-"))
    started = _start(args, logs)
    try:
        for name, (proc, port, _) in started.items():
            servers.wait_ready(proc, port, logs / f"{name}.log")
        url = f"http://127.0.0.1:{started['dynamic'][1]}"
        result: dict = {
            "benchmark": "serve",
            "artifact": str(args.artifact),
            "cpu_count": os.cpu_count(),
            "client_procs": args.client_procs,
            "provider": Client(url).json("GET", "/v2/models/gala")["parameters"]["provider"],
            "seconds": args.seconds,
            "rounds": args.rounds,
            "levels": {},
        }
        targets = _targets(started)
        for level in args.levels:
            result["levels"][str(level)] = _level(args, targets, shape, level)
        result["peak_rss_mib"] = {n: servers.peak_rss_mib(s[0].pid) for n, s in started.items()}
        if args.shards:
            result["gala_batch"] = inprocess.batch_throughput(url, args.shards)
    finally:
        servers.stop([proc for proc, _, _ in started.values()])
        shutil.rmtree(logs, ignore_errors=True)
    result["model_alone"] = inprocess.model_alone(args.artifact, args.providers)
    result["ort_vs_torch_cpu"] = inprocess.ort_vs_torch(args.artifact, "cpu")
    if result["provider"] == "CUDAExecutionProvider" and inprocess.cuda_for_torch():
        result["ort_vs_torch_cuda"] = inprocess.ort_vs_torch(args.artifact, "cuda")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = tuple(json.loads((args.artifact / "artifact.json").read_text())["input"]["shape"][1:])
    result = flood.run(args, shape) if args.flood else compare(args, shape)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
