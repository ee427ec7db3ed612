"""The servers a benchmark measures: gala-serve and the MLServer peer, each a process of its own
on free ports, waited for until ready, and stopped."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from gala_serve.client import Client

# The peer's custom runtime, in the source checkout (this package is installed editable).
PEER_DIR = Path(__file__).resolve().parents[3] / "tools" / "mlserver_peer"
READY_PATH = "/v2/models/gala/ready"


def gala(artifact: Path, max_batch: int, providers: str, log: Path, *flags: str) -> tuple:
    """A gala-serve process; (process, HTTP port, gRPC port)."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "gala_serve.app", "--artifact", str(artifact)]  # no script
    cmd += ["--port", str(port), "--grpc-port", str(grpc_port), "--max-batch", str(max_batch)]
    cmd += ["--max-delay-ms", "5", "--providers", providers, *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, grpc_port


def peer(python: str, artifact: Path, batching: bool, folder: Path, log: Path) -> tuple:
    """An MLServer process serving the artifact's ONNX graph; (process, HTTP port, None)."""
    port = free_port()
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
        "grpc_port": free_port(),
        "metrics_port": free_port(),
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


def wait_ready(proc: subprocess.Popen, port: int, log: Path, path: str = READY_PATH) -> None:
    """Return once ``path`` answers 200; RuntimeError with the log's tail if the process ends
    first or 180 s pass."""
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


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate them all, then wait for each (killed after 15 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of process ``pid`` (VmHWM), NaN where /proc does not say."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
