import contextlib
import os
import signal
import socket
import sys
import threading

import pytest
import torch

from gala_scale import dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    dist.destroy()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("OMP_NUM_THREADS", "1")


def _children() -> dict[int, str]:
    """This process's child processes: {pid: command line}."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
            for pid in map(int, f.read().split()):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmd:
                    found[pid] = cmd.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    return found


def pytest_sessionfinish(session, exitstatus):
    session.config._gala_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """End the run without the interpreter's teardown, after naming what a test left behind.

    Every outcome is decided and reported by now. What is left is the teardown of native
    libraries (DALI, ONNX Runtime, gloo, DeepSpeed) and of threads and processes that tests
    started, and a hang there would hold CI until its timeout. A test's leftover process is
    killed and named; then the process exits with pytest's status.
    """
    # Non-daemon threads are what the interpreter's exit would wait for.
    threads = [
        t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()
    ]
    children = _children()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if threads or children:
        print(f"\n[conftest] left at exit: threads {threads}, processes {children} (killed)")
    status = getattr(config, "_gala_exitstatus", None)
    if status is not None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            stream.flush()
        os._exit(status)
