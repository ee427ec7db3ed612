"""Serve an exported artifact and send a data set through it: what quickstart, rehearse and the
tests do after training.

    with serving(export, "--providers", "cpu", grpc=True) as server:
        summary = send(server, shards, out / "predictions.jsonl")

The server is a process of its own (that is the point: the torch-free package, as deployed);
the batch job runs in this process through gala-batch's own function. Whatever happens inside
the ``with``, the server is stopped before it is left (SIGTERM, then SIGKILL after a grace), and
the error that ended the block is the one that propagates.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gala_scale.system import free_port

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:<port>
    grpc: str | None  # 127.0.0.1:<port> when started with gRPC
    process: subprocess.Popen


def stop(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """End ``process``: SIGTERM, and SIGKILL if it is still there after ``grace_s``. Never
    raises, so it cannot hide the error of the code that was using the process."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serving(
    artifact: Path,
    *flags: str,
    grpc: bool = False,
    log=None,
    env: dict | None = None,
    ready_s: float = 300.0,
    cwd: Path | None = None,
    ports: Callable[[], int] = free_port,
) -> Iterator[Server]:
    """``gala-serve`` on ``artifact`` at free ports (from ``ports``), yielded once it answers
    ready; ``log`` (an open file) takes its output, else it shares this process's."""
    from gala_serve.client import Client

    port = ports()
    cmd = [str(BIN / "gala-serve"), "--artifact", str(artifact), "--port", str(port), *flags]
    grpc_address = None
    if grpc:
        grpc_port = ports()
        cmd += ["--grpc-port", str(grpc_port)]
        grpc_address = f"127.0.0.1:{grpc_port}"
    print(f"\n== serve\n$ {' '.join(cmd)}", flush=True)
    output = {"stdout": log, "stderr": subprocess.STDOUT} if log is not None else {}
    process = subprocess.Popen(cmd, env=env, cwd=cwd, **output)
    try:
        url = f"http://127.0.0.1:{port}"
        Client(url).wait_ready(ready_s, alive=lambda: process.poll() is None)
        yield Server(url, grpc_address, process)
    finally:
        stop(process)


def send(
    server: Server,
    source: Path,
    out: Path,
    *,
    split: str = "test",
    concurrency: int = 4,
    use_grpc: bool = False,
) -> dict:
    """gala-batch's job on ``source`` through ``server`` (its summary: images, errors, seconds,
    and with labels top-1 and shot-group accuracy as fractions); predictions in ``out``."""
    from gala_serve import batch

    argv = ["--server", server.url, "--input", str(source), "--split", split]
    argv += ["--out", str(out), "--concurrency", str(concurrency)]
    if use_grpc:
        argv += ["--grpc", server.grpc]
    print(f"\n== batch inference through the server\n$ gala-batch {' '.join(argv)}", flush=True)
    return batch.run(batch.parse_args(argv))


__all__ = ["Server", "send", "serving", "stop"]
