"""Submitting slurm/inat_gala.sh to the test cluster started by tools/slurm_cluster.sh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import ENV, ROOT

SLURM_DIR = Path(os.environ.get("GALA_SLURM_DIR", "/tmp/gala-slurm"))
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def cluster_env() -> dict:
    """SLURM_CONF of a running test cluster, or skip saying why there is none."""
    if (SLURM_DIR / "unavailable").exists():
        pytest.skip(
            f"test Slurm cluster could not start: {(SLURM_DIR / 'unavailable').read_text()}"
        )
    env_file = SLURM_DIR / "env"
    if not env_file.exists():
        pytest.skip(
            f"no test Slurm cluster at {SLURM_DIR}: run `bash tools/slurm_cluster.sh start`"
        )
    conf = env_file.read_text().split("=", 1)[1].strip()
    env = {**ENV, "SLURM_CONF": conf}
    probe = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True
    )
    if probe.returncode != 0 or probe.stdout.count("idle") + probe.stdout.count("mix") < 2:
        pytest.skip(f"test Slurm cluster not answering: {probe.stderr.strip() or probe.stdout}")
    return env


def submit(
    env: dict,
    run_dir: Path,
    extra: str,
    log_dir: Path,
    *,
    port: int,
    sbatch: tuple[str, ...] = (),
    script_env: dict | None = None,
) -> str:
    job_env = {
        **env,
        "CONFIG": "configs/debug.yaml",
        "RUN_DIR": str(run_dir),
        "GPUS_PER_NODE": "1",
        "DEEPSPEED_CONFIG": "none",
        "VENV": str(Path(sys.prefix)),
        "PORT": str(port),
        "EXTRA_ARGS": extra,
        **(script_env or {}),
    }
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gres=none",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={log_dir}/job-%j.out",
            f"--chdir={ROOT}",
            *sbatch,
            str(ROOT / "slurm" / "inat_gala.sh"),
        ],
        env=job_env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait(env: dict, job: str, timeout: float = 300, until=FINAL_STATES) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in until:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} did not reach {until} in {timeout} s: {job_info(env, job)}")


def job_log(log_dir: Path, job: str) -> str:
    return (log_dir / f"job-{job}.out").read_text()
