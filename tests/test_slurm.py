"""The real slurm/inat_gala.sh on a real two-node Slurm (tools/slurm_cluster.sh start)."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from shard_fixtures import corrupt_an_image
from slurm_helpers import cluster_env, job_log, submit, wait
from train_helpers import explain, ranks, results, run_accelerate

from gala_scale import runtime
from gala_scale.shards.__main__ import main as shards_main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one cluster: one worker
# Long enough that the preemption signal lands before the job ends, whatever the load.
LONGER = "train.epochs=8"


@pytest.fixture(scope="module")
def env():
    return cluster_env()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm") / "synthetic"
    assert shards_main(["build", "synthetic", "--out", str(out), "--workers", "1"]) == 0
    return out


def extra(shards, *more: str) -> str:
    return " ".join([f"data.shards={shards}", "data.num_workers=1", *more])


@pytest.mark.parametrize("deepspeed", ["none", "configs/deepspeed/zero2.json"])
def test_two_node_job_completes(env, shards, tmp_path, port, deepspeed):
    """Each node's launcher starts its process, DeepSpeed's with its JIT op already built: the
    job names the folder the session built it in (TORCH_EXTENSIONS_DIR, which the script keeps
    when set; unset, each job builds its own, half a minute a node on these CPUs)."""
    run_dir = tmp_path / "run"
    built = {"TORCH_EXTENSIONS_DIR": str(runtime.private_extension_dir())}
    script_env = {"DEEPSPEED_CONFIG": deepspeed, **built}
    job = submit(env, run_dir, extra(shards), tmp_path, port=port, script_env=script_env)
    info = wait(env, job)
    assert info["JobState"] == "COMPLETED", job_log(tmp_path, job)[-4000:]
    records = ranks(run_dir)
    assert sorted((r["rank"], r["slurm_nodeid"]) for r in records) == [(0, "0"), (1, "1")]
    assert records[0]["ledger_sha256"] == records[1]["ledger_sha256"]  # the ledger is synced
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "pn.json",
        "final",
        "best",
        "plots/per_class_accuracy.png",
        "checkpoints/e0003-s000000",
    ):
        assert (run_dir / name).exists(), name
    log = job_log(tmp_path, job)
    assert "2 nodes x 1 processes" in log
    if deepspeed != "none":  # DeepSpeed ran, with its launcher that needs no pdsh
        assert (run_dir / "checkpoints" / "e0003-s000000" / "latest").is_file()


def test_preempted_job_requeues_resumes_and_matches(env, shards, tmp_path, port):
    reference = tmp_path / "reference"
    args = [
        "--config",
        "configs/debug.yaml",
        f"run_dir={reference}",
        *extra(shards, LONGER).split(),
    ]
    proc = run_accelerate(args, port + 1)
    assert proc.returncode == 0, explain(proc)

    run_dir = tmp_path / "preempted"
    job = submit(env, run_dir, extra(shards, LONGER), tmp_path, port=port)
    wait(env, job, until=("RUNNING",))
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "e0001-s000000").exists() and time.time() < deadline:
        time.sleep(0.2)
    before = {p.name for p in (run_dir / "checkpoints").glob("e*")}
    signalled = time.time()
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)
    checkpointed = resumed = None
    while time.time() < deadline + 300 and resumed is None:
        # The stop's checkpoint: any new one (at an epoch's end it is an epoch checkpoint).
        if checkpointed is None and {p.name for p in (run_dir / "checkpoints").glob("e*")} - before:
            checkpointed = time.time()
        if "resuming from" in job_log(tmp_path, job):
            resumed = time.time()
        time.sleep(0.2)
    info = wait(env, job, timeout=400)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) >= 1
    assert "stop requested (signal 15)" in log and "trainer exit 99" in log
    assert "resuming from" in log
    records = ranks(run_dir)
    assert {r["slurm_restart_count"] for r in records} == {info["Restarts"]}
    assert records[0]["ledger_sha256"] == ranks(reference)[0]["ledger_sha256"]
    assert results(run_dir)["test"] == results(reference)["test"]

    def after(moment: float | None) -> str:  # None: between two polls, or gone before the next
        return "unseen" if moment is None else f"{moment - signalled:.1f} s"

    print(
        f"\npreemption: checkpoint written {after(checkpointed)} after the signal, training "
        f"resumed {after(resumed)} after it, job done after {after(time.time())}"
    )


def test_repeated_failures_stop_requeueing(env, shards, tmp_path, port):
    """A crash (an exception the trainer has no exit code for) is requeued, MAX_RESTARTS times."""
    run_dir = tmp_path / "broken"
    crash = {"PYTHONPATH": str(Path(__file__).parent / "crash_site"), "MAX_RESTARTS": "1"}
    job = submit(env, run_dir, extra(shards), tmp_path, port=port, script_env=crash)
    info = wait(env, job, timeout=300)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED", log[-3000:]
    assert info["Restarts"] == "1", log[-3000:]
    assert "crash injected by tests/crash_site" in log
    assert "requeueing (trainer exit none)" in log
    assert "stopped after 1 restarts; not requeueing" in log


@pytest.mark.parametrize("case", ["no shard set", "a bad value", "an image changed"])
def test_an_error_a_restart_repeats_is_not_requeued(env, shards, tmp_path, port, case):
    run_dir, shown = tmp_path / "run", "a restart repeats (exit 2)"
    if case == "no shard set":
        args = extra(tmp_path / "no-such-shards")
    elif case == "a bad value":  # found by the script's own config read, before the launch
        args, shown = extra(shards, "data.color_jitter=1.5"), "data.color_jitter: must be in"
    else:
        changed = tmp_path / "changed"
        shutil.copytree(shards, changed)
        corrupt_an_image(sorted((changed / "train").glob("*.tar"))[0])
        args = extra(changed)
    job = submit(env, run_dir, args, tmp_path, port=port)
    info = wait(env, job, timeout=300)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]
    assert shown in log and "requeueing" not in log, log[-3000:]
    if case == "an image changed":
        assert "image does not decode" in log


def test_too_few_cpus_for_the_data_threads_fail_before_launch(env, shards, tmp_path, port):
    run_dir = tmp_path / "starved"
    job = submit(env, run_dir, extra(shards, "data.num_workers=2"), tmp_path, port=port)
    info = wait(env, job, timeout=120)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]
    assert "--cpus-per-task=1 is fewer than 1 processes x 2 data.num_workers" in log
    assert not run_dir.exists()  # nothing launched


def test_non_finite_loss_is_not_requeued(env, shards, tmp_path, port):
    run_dir = tmp_path / "nan"
    job = submit(env, run_dir, extra(shards, "optim.lr=1e30"), tmp_path, port=port)
    info = wait(env, job, timeout=300)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]
    assert "NaN or infinite on" in log and "a restart repeats (exit 3)" in log
