"""Crash recovery without Slurm: a killed rank, a kill during a checkpoint write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import (
    ENV,
    ROOT,
    accelerate_cmd,
    debug_overrides,
    explain,
    ranks,
    results,
    run_accelerate,
    run_single,
)

from gala_scale.checkpoint import newest_checkpoint
from gala_scale.shards.__main__ import main as shards_main

pytestmark = pytest.mark.slow
LONGER = ("train.epochs=4", "data.num_workers=1")
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "synthetic"
    assert shards_main(["build", "synthetic", "--out", str(out), "--workers", "1"]) == 0
    return out


def test_killed_rank_fails_the_launch_fast_and_resume_finishes(shards, tmp_path, port):
    reference = tmp_path / "reference"
    proc = run_accelerate(debug_overrides(shards, reference, *LONGER), port)
    assert proc.returncode == 0, explain(proc)
    first = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    per_epoch = first["steps"]

    run_dir = tmp_path / "crashed"
    args = debug_overrides(shards, run_dir, *LONGER)
    launch = subprocess.Popen(
        [*accelerate_cmd(port, script=HERE / "die_at_step.py"), *args],
        cwd=ROOT,
        env={**ENV, "DIE_RANK": "1", "DIE_AT_STEP": str(per_epoch + per_epoch // 2)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.time()
    _, err = launch.communicate(timeout=300)  # not gloo's 30-minute timeout: the launch ends
    took = time.time() - start
    assert launch.returncode != 0
    assert "SIGKILL" in err or "exitcode: -9" in err, err[-3000:]
    assert newest_checkpoint(run_dir).name == "e0001-s000000"  # it died in epoch 2

    started = time.time()
    proc = run_accelerate([*args, "--resume", "auto"], port)
    assert proc.returncode == 0, explain(proc)
    assert "resuming from" in proc.stdout + proc.stderr
    assert ranks(run_dir)[0]["ledger_sha256"] == ranks(reference)[0]["ledger_sha256"]
    assert results(run_dir)["test"] == results(reference)["test"]
    print(f"\ncrashed launch: {took:.1f} s in all; resumed run: {time.time() - started:.1f} s")


@pytest.mark.parametrize(
    ("ledger", "at_end"),
    [("sum", False), ("sum_of_sums", False), ("sum", True)],
    ids=["sum", "sum_of_sums", "sum-at-the-epochs-last-step"],
)
def test_a_stop_inside_an_epoch_resumes_where_every_loader_stood(shards, tmp_path, ledger, at_end):
    """The mid-epoch checkpoint holds each (virtual) rank's DALI pipeline state and the unsynced
    ledger delta (with sum_of_sums also S's and the steps since the sync); the resumed run
    restores them instead of decoding the skipped batches, and ends as the uninterrupted one.

    A stop seen at an epoch's last step finishes that epoch (ledger sync, val, its checkpoint)
    and leaves an epoch checkpoint, not a mid-epoch one at the epoch's end."""
    extra = (*LONGER, "train.log_every=1", "train.emulate_world=2", f"loss.ledger={ledger}")
    reference = tmp_path / "reference"
    proc = run_single(debug_overrides(shards, reference, *extra))
    assert proc.returncode == 0, explain(proc)
    per_epoch = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])["steps"]

    run_dir = tmp_path / "stopped"
    args = debug_overrides(shards, run_dir, *extra)
    # Asked to stop before this SGD step, the run stops after it, in epoch 2.
    stop_at = 2 * per_epoch if at_end else per_epoch + per_epoch // 2
    proc = subprocess.run(
        [sys.executable, str(HERE / "die_at_step.py"), *args],
        cwd=ROOT,
        env={**ENV, "DIE_RANK": "0", "DIE_AT_STEP": str(stop_at), "DIE_SIGNAL": "SIGUSR1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 99, explain(proc)
    checkpoint = newest_checkpoint(run_dir)
    step = stop_at - per_epoch  # SGD steps done in epoch 2
    stood = (2, 0) if at_end else (1, step)  # the loaders ended epoch 2, or stand inside it
    for rank in (0, 1):
        state = json.loads((checkpoint / f"loader_rank{rank}.json").read_text())
        assert (state["rank"], state["epoch"], state["step"]) == (rank, *stood)
    if at_end:  # epoch 2 finished: its record written, its ledger synced
        assert checkpoint.name == "e0002-s000000"
        train = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in train if r["type"] == "train"] == [0, 1]
        assert not list(checkpoint.glob("ledger_delta_rank*"))
    else:
        assert checkpoint.name == f"e0001-s{step:06d}"
        delta = load_file(checkpoint / "ledger_delta_rank0.safetensors")
        assert delta["theta"].sum() > 0  # mid-epoch: an unsynced delta
        if ledger == "sum_of_sums":
            assert float(delta["steps"]) == step and (delta["s_theta"] > delta["theta"]).any()

    resumed = run_single([*args, "--resume", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert checkpoint.name in resumed.stderr and "WARNING" not in resumed.stderr
    assert ranks(run_dir)[0]["ledger_sha256"] == ranks(reference)[0]["ledger_sha256"]
    assert results(run_dir)["test"] == results(reference)["test"]


KILL_DURING_SAVE = """
import os, sys
import accelerate
original = accelerate.Accelerator.save_state
def save_then_die(self, output_dir=None, **kwargs):
    result = original(self, output_dir, **kwargs)
    if "e0002" in str(output_dir):
        os.kill(os.getpid(), 9)  # the files are written, the folder not yet renamed
    return result
accelerate.Accelerator.save_state = save_then_die
from gala_scale.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_checkpoint_killed_while_written_is_never_used(shards, tmp_path):
    reference = tmp_path / "reference"
    assert run_single(debug_overrides(shards, reference)).returncode == 0
    run_dir = tmp_path / "killed"
    args = debug_overrides(shards, run_dir)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL
    root = run_dir / "checkpoints"
    assert (root / ".tmp-e0002-s000000" / "model.safetensors").exists()
    assert newest_checkpoint(run_dir) == root / "e0001-s000000"
    resumed = run_single([*args, "--resume", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming from" in resumed.stderr and "e0001-s000000" in resumed.stderr
    assert results(run_dir)["test"] == results(reference)["test"]
    assert not list(root.glob(".tmp-*"))


def test_sigterm_to_the_whole_process_group_still_checkpoints(shards, tmp_path):
    """As Slurm preempts a step: every process gets SIGTERM, the loader's workers too."""
    # ResNet-20: epochs long enough that the signal lands inside epoch 2, whatever the load.
    run_dir = tmp_path / "preempted"
    args = debug_overrides(shards, run_dir, *LONGER, "model.name=resnet20", "data.loader=torch")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gala_scale.train", *args],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "e0001-s000000").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into epoch 2, its DataLoader worker running
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 99, err[-3000:]
    assert "stop requested (signal 15)" in out + err
    assert newest_checkpoint(run_dir).name.startswith("e0001-s")
    assert newest_checkpoint(run_dir).name != "e0001-s000000"
