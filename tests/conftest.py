import contextlib
import multiprocessing.process
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

# A DeepSpeed launch waits at most this long on another's extension build (a build takes about a
# minute here); set before train_helpers copies the environment for the tests' processes.
os.environ.setdefault("GALA_EXTENSION_WAIT_S", "300")

from shard_fixtures import build_small_synthetic
from train_helpers import debug_overrides, explain, run_single

from gala_scale import dist, runtime, system

# Ports for the servers and rendezvous that tests start: a block per pytest-xdist worker, below
# Linux's ephemeral range (32768-60999), so no two workers (and no outgoing connection) are given
# the same port between its release here and the child's bind.
_PORT_BLOCK = 500
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORTS = range(20000 + _WORKER * _PORT_BLOCK, 20000 + (_WORKER + 1) * _PORT_BLOCK)


def free_port() -> int:
    return system.free_port(_PORTS)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """The suite's one small synthetic shard set (6 classes, IF 20, 10 val and 20 test images a
    class); tests only read it."""
    return build_small_synthetic(
        tmp_path_factory.mktemp("shared") / "synthetic", **{"val-per-class": 10}
    )


@pytest.fixture(scope="session")
def trained_run(synthetic_shards, tmp_path_factory):
    """One finished run of configs/debug.yaml on it (3 epochs, one process), for the tests that
    read a run: export, serving, stage 2 from a run (which adds its feature cache)."""
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    proc = run_single(debug_overrides(synthetic_shards, run_dir))
    assert proc.returncode == 0, explain(proc)
    return run_dir


@pytest.fixture(scope="session")
def artifact(trained_run):
    """The exported artifact of that run's best weights, with its Triton model folder."""
    from gala_scale.export import export

    out = trained_run / "export"
    export(trained_run, out, "best", triton=True)
    return out


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    dist.destroy()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The unit tier (``-m "not slow"``) starts no process: a test that does, in its body or in
    a fixture it sets up (a server, a trained run), must be marked slow."""
    if "slow" in item.keywords:
        yield
        return

    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{item.nodeid} starts a process: mark it @pytest.mark.slow (the unit tier starts none)"
        )

    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess.Popen, "__init__", refuse)
    patch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    patch.setattr(os, "fork", refuse)
    try:
        yield
    finally:
        patch.undo()


# The longest tests (minutes each on 2 cores) go first, so that two xdist workers do not end
# with one of them alone on a long test; the rest keep their order.
LONGEST_FIRST = ("test_chaos", "test_rehearse", "test_gpu_check", "test_quickstart", "test_slurm")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("OMP_NUM_THREADS", "1")


def _children(of: int | str = "self", deep: bool = False) -> dict[int, str]:
    """The child processes of ``of`` (and theirs, ``deep``): {pid: command line}."""
    found = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{of}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{of}/task/{task}/children") as f:
                for pid in map(int, f.read().split()):
                    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmd:
                        found[pid] = cmd.read().replace(b"\0", b" ").decode(errors="replace")
                    if deep:
                        found |= _children(pid, deep=True)
    return found


def _dump_and_kill_descendants(terminal) -> None:
    """The Python stacks of every process the test started (py-spy), then SIGKILL for each: a
    hung test names where each of its processes waited, and leaves none behind."""
    descendants = _children(deep=True)
    for pid, cmd in descendants.items():
        terminal.sep("+", title=f"process {pid}: {cmd[:160]}")
        try:
            dump = subprocess.run(
                [str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", str(pid)],
                capture_output=True,
                text=True,
                timeout=20,
            )
            terminal.write(dump.stdout + dump.stderr)
        except (OSError, subprocess.SubprocessError) as err:
            terminal.write(f"no stack ({err})\n")
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's signal method, with the stacks of the test's processes dumped first."""
    import pytest_timeout

    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own timer

    def handler(signum, frame):
        __tracebackhide__ = True
        _dump_and_kill_descendants(item.config.get_terminal_writer())
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def pytest_sessionstart(session):
    """Build DeepSpeed's op once, before any test, in each process that runs the slow tests: a
    test that kills a launch (a fault test, a step's budget) would otherwise kill the build and
    leave its lock for every later launch to wait on."""
    option = session.config.option
    controller = getattr(option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ
    if controller or "not slow" in (option.markexpr or ""):
        return
    runtime.build_extensions()


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
