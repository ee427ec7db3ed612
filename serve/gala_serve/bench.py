"""Benchmark the server against a peer: protocols, dynamic batching, latency, memory, ORT vs torch.

    python -m gala_serve.bench --artifact DIR [--seconds 3] [--rounds 3] [--levels 1 8 32]
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

    python -m gala_serve.bench --artifact DIR --flood [--concurrency 64] [--requests 5000]
                               [--rows 16] [--max-queue 64] [--flood-max-batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from gala_serve.client import Client

LEVELS = (1, 8, 32)
PEER_DIR = Path(__file__).resolve().parents[2] / "tools" / "mlserver_peer"
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _gala(artifact: Path, max_batch: int, providers: str, log: Path, *flags: str) -> tuple:
    """A gala-serve process; (process, HTTP port, gRPC port)."""
    port, grpc_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "gala_serve.app", "--artifact", str(artifact)]  # no script
    cmd += ["--port", str(port), "--grpc-port", str(grpc_port), "--max-batch", str(max_batch)]
    cmd += ["--max-delay-ms", "5", "--providers", providers, *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, grpc_port


def _peer(python: str, artifact: Path, batching: bool, folder: Path, log: Path) -> tuple:
    """An MLServer process serving the artifact's ONNX graph; (process, HTTP port, None)."""
    port = _free_port()
    folder.mkdir(parents=True)
    shutil.copy(PEER_DIR / "onnx_peer.py", folder / "onnx_peer.py")
    model = {
        "name": "gala",
        "implementation": "onnx_peer.OnnxPeer",
        "parameters": {"uri": str((artifact / "model.onnx").resolve())},
    }
    if batching:
        model.update(max_batch_size=64, max_batch_time=0.005)
    settings = {
        "http_port": port,
        "grpc_port": _free_port(),
        "metrics_port": _free_port(),
        "parallel_workers": 0,  # inference in the server process, as in gala-serve
        "host": "127.0.0.1",
    }
    (folder / "model-settings.json").write_text(json.dumps(model))
    (folder / "settings.json").write_text(json.dumps(settings))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(python).parent / "mlserver"), "start", str(folder)],
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, port, None


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, path: str) -> None:
    client = Client(f"http://127.0.0.1:{port}", retries=0)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            if client.http.get(path).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not get ready:\n{log.read_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)


@dataclass
class Target:
    name: str
    kind: str  # json | binary | grpc
    port: int


def _request(kind: str, shape: tuple[int, ...], rows: int = 1):
    """What one client sends: (body, headers) over HTTP, a ModelInferRequest over gRPC."""
    x = _inputs(shape, rows)
    spec = {"name": "input", "shape": [rows, *shape], "datatype": "FP32"}
    if kind == "grpc":
        from tritonclient.grpc import service_pb2 as pb

        request = pb.ModelInferRequest(model_name="gala")
        request.inputs.add(name="input", datatype="FP32", shape=[rows, *shape])
        request.outputs.add(name="probabilities")
        request.raw_input_contents.append(x.tobytes())
        return request
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

        request = _request("grpc", shape)
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{target.port}"))
        return lambda: stub.ModelInfer(request, timeout=30)
    body, headers = _request(target.kind, shape)
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


def flood(
    url: str, shape: tuple[int, ...], concurrency: int, requests: int, rows: int, timeout: float
) -> dict:
    """``requests`` binary infer requests of ``rows`` samples, ``concurrency`` at a time, back
    to back on one event loop (httpx): the count of each answer (a status, ``timeout`` or the
    transport error), the 503 share, the ``Retry-After`` values seen, latency quantiles, and
    the seconds one plain request takes afterwards."""
    body, headers = _request("binary", shape, rows)
    result = asyncio.run(_flood(url, body, headers, concurrency, requests, timeout))
    result["rows"] = rows
    with httpx.Client(base_url=url, timeout=timeout) as http:
        start = time.perf_counter()
        after = http.post("/v2/models/gala/infer", content=body, headers=headers)
        result["after_s"], result["after_status"] = time.perf_counter() - start, after.status_code
    return result


async def _flood(url: str, body: bytes, headers: dict, concurrency: int, requests: int, timeout):
    answers: collections.Counter = collections.Counter()
    latencies: list[tuple[str, float]] = []
    retry_after: set = set()
    todo = iter(range(requests))  # shared: each client takes the next until none is left
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:

        async def client() -> None:
            for _ in todo:
                start = time.perf_counter()
                try:
                    response = await http.post(
                        "/v2/models/gala/infer", content=body, headers=headers
                    )
                    answer = response.status_code
                    if answer == 503:
                        retry_after.add(response.headers.get("retry-after"))
                except httpx.TimeoutException:
                    answer = "timeout"
                except httpx.TransportError as err:
                    answer = type(err).__name__
                answers[answer] += 1
                latencies.append((str(answer), time.perf_counter() - start))

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - begin
    q = np.quantile([t for _, t in latencies], [0.5, 0.99, 1.0])
    by_answer = {}
    for answer in sorted({a for a, _ in latencies}):
        mine = np.quantile([t for a, t in latencies if a == answer], [0.5, 0.99])
        by_answer[answer] = {"p50_ms": 1000 * mine[0], "p99_ms": 1000 * mine[1]}
    return {
        "requests": requests,
        "concurrency": concurrency,
        "seconds": seconds,
        "answers": {str(k): v for k, v in sorted(answers.items(), key=str)},
        "share_503": answers[503] / requests,
        "retry_after": sorted(map(str, retry_after)),
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
        "max_ms": 1000 * q[2],
        "by_answer": by_answer,
    }


def flood_main(args: argparse.Namespace, shape: tuple[int, ...]) -> int:
    """One gala-serve with a small queue, flooded; the figures as one JSON line."""
    logs = Path(tempfile.mkdtemp(prefix="gala-serve-flood-"))
    flags = ["--max-queue", str(args.max_queue), "--max-request-batch", str(args.rows)]
    proc, port, _ = _gala(
        args.artifact, args.flood_max_batch, args.providers, logs / "flood.log", *flags
    )
    try:
        _wait_ready(proc, port, logs / "flood.log", "/v2/models/gala/ready")
        url = f"http://127.0.0.1:{port}"
        result = flood(url, shape, args.concurrency, args.requests, args.rows, timeout=30)
        result.update(
            benchmark="flood",
            cpu_count=os.cpu_count(),
            max_queue=args.max_queue,
            max_batch=args.flood_max_batch,
            provider=Client(url).json("GET", "/v2/models/gala")["parameters"]["provider"],
            peak_rss_mib=_peak_rss_mib(proc.pid),
        )
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(logs, ignore_errors=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _summary(latencies: list[float], seconds: float) -> dict:
    q = np.quantile(latencies, [0.5, 0.99])
    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
        "requests": len(latencies),
    }


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
            {
                "ort": lambda x=x: session.run(["logits"], {"input": x}),
                "torch": lambda tx=tx: eager(tx),
            },
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
    args = p.parse_args(argv)
    shape = tuple(json.loads((args.artifact / "artifact.json").read_text())["input"]["shape"][1:])
    if args.flood:
        return flood_main(args, shape)
    logs = Path(tempfile.mkdtemp(prefix="gala-serve-bench-"))
    servers = {
        "dynamic": _gala(args.artifact, 64, args.providers, logs / "dynamic.log"),
        "max_batch_1": _gala(args.artifact, 1, args.providers, logs / "max_batch_1.log"),
    }
    if args.peer_python:
        for name, batching in (("peer_adaptive", True), ("peer", False)):
            servers[name] = _peer(
                args.peer_python, args.artifact, batching, logs / name, logs / f"{name}.log"
            )
    try:
        for name, (proc, port, _) in servers.items():
            _wait_ready(proc, port, logs / f"{name}.log", "/v2/models/gala/ready")
        dynamic, single = servers["dynamic"], servers["max_batch_1"]
        targets = [
            Target("gala_json", "json", dynamic[1]),
            Target("gala_binary", "binary", dynamic[1]),
            Target("gala_grpc", "grpc", dynamic[2]),
            Target("gala_max_batch_1", "binary", single[1]),
        ]
        targets += [
            Target(n, "json", servers[n][1]) for n in ("peer_adaptive", "peer") if n in servers
        ]
        meta = Client(f"http://127.0.0.1:{dynamic[1]}").json("GET", "/v2/models/gala")
        result: dict = {
            "benchmark": "serve",
            "artifact": str(args.artifact),
            "cpu_count": os.cpu_count(),
            "client_procs": args.client_procs,
            "provider": meta["parameters"]["provider"],
            "seconds": args.seconds,
            "rounds": args.rounds,
            "levels": {},
        }
        for level in args.levels:
            samples = {t.name: ([], 0.0) for t in targets}
            for r in range(args.rounds):
                k = r % len(targets)
                for target in targets[k:] + targets[:k]:
                    lat, sec = load(target, shape, level, args.seconds, args.client_procs)
                    samples[target.name] = (
                        samples[target.name][0] + lat,
                        samples[target.name][1] + sec,
                    )
            row = {name: _summary(*sample) for name, sample in samples.items()}
            for name, stats in row.items():
                print(f"concurrency {level}, {name}: {stats}", flush=True)
            rps = {name: stats["requests_per_s"] for name, stats in row.items()}
            row["dynamic_over_max_batch_1"] = {
                "throughput": rps["gala_binary"] / rps["gala_max_batch_1"],
                "p99": row["gala_binary"]["p99_ms"] / row["gala_max_batch_1"]["p99_ms"],
            }
            peers = [rps[n] for n in ("peer_adaptive", "peer") if n in rps]
            if peers:
                row["json_over_peer"] = rps["gala_json"] / max(peers)
                row["binary_over_peer"] = rps["gala_binary"] / max(peers)
            result["levels"][str(level)] = row
        result["peak_rss_mib"] = {n: _peak_rss_mib(s[0].pid) for n, s in servers.items()}
        if args.shards:
            result["gala_batch"] = batch_throughput(f"http://127.0.0.1:{dynamic[1]}", args.shards)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(logs, ignore_errors=True)
    result["model_alone"] = model_alone(args.artifact, args.providers)
    result["ort_vs_torch_cpu"] = ort_vs_torch(args.artifact, "cpu")
    if result["provider"] == "CUDAExecutionProvider" and _cuda_for_torch():
        result["ort_vs_torch_cuda"] = ort_vs_torch(args.artifact, "cuda")
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
