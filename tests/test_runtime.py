"""Run-wide agreement (stop, non-finite loss, run directory, resume point) and sync points."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gala_scale import engine, runtime
from gala_scale.losses import GALALoss

HERE = Path(__file__).parent


def two_ranks(case: str, base: Path, port: int) -> list[dict]:
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "runtime_worker.py"), case, str(base), str(base / f"{r}")],
            env={**env, "RANK": str(r), "CUDA_VISIBLE_DEVICES": ""},
        )
        for r in range(2)
    ]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    return [json.loads((base / f"{r}").read_text()) for r in range(2)]


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, port):
    seen = two_ranks("nonfinite", tmp_path, port)
    assert [s["first"] for s in seen] == [[False, 1.0], [False, 1.0]]
    for s in seen:
        assert s["raised"] and "on 1 of 2 rank(s)" in s["raised"]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank(tmp_path, port):
    assert [s["stop"] for s in two_ranks("stop", tmp_path, port)] == [True, True]


@pytest.mark.slow
def test_run_dir_not_shared_by_every_rank_is_a_clear_error(tmp_path, port):
    seen = two_ranks("shared", tmp_path, port)
    for s in seen:
        assert s["error"] and "not shared by all nodes (1 of 2 ranks" in s["error"]
    assert not list((tmp_path / "node0").glob(".shared-check-*"))  # the probe is removed


@pytest.mark.slow
def test_every_rank_resumes_from_rank_0s_choice(tmp_path, port):
    for name in ("e0001-s000000", "e0002-s000000"):
        (tmp_path / "run" / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "stale" / "checkpoints" / "e0001-s000000").mkdir(parents=True)
    seen = two_ranks("resume", tmp_path, port)
    assert {s["resume"] for s in seen} == {str(tmp_path / "run" / "checkpoints" / "e0002-s000000")}


class SyncCounter:
    """Counts the calls that copy a tensor's value to the host (the CPU stand-in for a
    CUDA device-to-host sync): item, tolist, bool, float, int, numpy."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapper(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_a_training_step_reads_nothing_back_between_checks(monkeypatch):
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    criterion = GALALoss(5, check_finite=False)
    batches = [(torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))) for _ in range(40)]
    checks = []
    with runtime.Guard() as guard:
        counter = SyncCounter(monkeypatch)
        result = engine.train_one_epoch(
            model,
            criterion,
            optimizer,
            scheduler,
            batches,
            accelerator,
            guard,
            first_step=0,
            sync_every=0,
            check_every=10,
            on_check=lambda step, loss: checks.append(step),
        )
    monkeypatch.undo()
    assert result.steps == 40 and not result.stopped and criterion.theta.sum() > 0
    assert checks == [9, 19, 29, 39]
    # One read a check (4) and the epoch's global mean loss: 5 for 40 steps, not 3 a step.
    assert counter.calls == ["tolist"] * 5, counter.calls


def test_guard_gives_the_signal_handlers_back():
    """A process forked after the guard (a multiprocessing pool) must still die of SIGTERM."""
    before = signal.getsignal(signal.SIGTERM)
    with runtime.Guard() as guard:
        assert signal.getsignal(signal.SIGTERM) == guard._handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_loss_check_alone_syncs_once_a_step(monkeypatch):
    """What the trainer avoids: GALALoss(check_finite=True) reads the loss back every call."""
    counter = SyncCounter(monkeypatch)
    GALALoss(5)(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    monkeypatch.undo()
    assert counter.calls == ["__bool__"]


def test_the_extension_folder_is_built_with_this_environments_ninja(tmp_path, monkeypatch):
    """An un-activated venv (the system's ninja first on the PATH) and an activated one (a Slurm
    job) must build the folder with the same ninja, or each rebuilds the other's build."""
    import shutil

    tools = Path(sys.executable).parent
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert runtime.private_extension_dir() == tmp_path / "ext"
    assert os.environ["PATH"] == f"{tools}:/usr/bin:/bin"
    runtime.private_extension_dir()  # once, however often it is asked
    assert os.environ["PATH"] == f"{tools}:/usr/bin:/bin"
    if (tools / "ninja").exists():
        assert shutil.which("ninja") == str(tools / "ninja")
