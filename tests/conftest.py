import os
import socket

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


def pytest_unconfigure(config):
    """Name what could keep the interpreter from exiting, and never let it hang CI."""
    import faulthandler
    import sys
    import threading

    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    children = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children += f.read().split()
        except OSError:
            pass
    if alive or children:
        print(
            f"\n[conftest] at exit: threads {alive}, child processes {children}",
            file=sys.__stderr__,
        )
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)
