"""What a run directory records besides checkpoints and metrics: the resolved config, the git
revision, each rank's record and the exit status the Slurm script reads; and the exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import torch
import yaml

from gala_scale import publish
from gala_scale.config import RunConfig, to_dict
from gala_scale.run import Run
from gala_scale.runtime import precision
from gala_scale.system import peak_rss_mib

EXIT_PREEMPTED = 99  # checkpointed on a stop signal: --resume auto goes on (requeued)
EXIT_CONFIG = 2  # found before training: a config, a data set that cannot be used (not requeued)
EXIT_FAILED = 3  # met while training and met again by a restart (not requeued)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_files(cfg: RunConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    publish.write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    publish.write_text(run_dir / "git_revision.txt", git_revision() + "\n")


def rank_record(run: Run, state, code: int) -> None:
    """Each rank says who and where it was and which ledger it ended with (for checks)."""
    acc = run.accelerator
    ledger = None
    if run.parts.criterion.ledger is not None:
        raw = b"".join(v.numpy().tobytes() for v in run.parts.criterion.ledger.tensors().values())
        ledger = hashlib.sha256(raw).hexdigest()
    record = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "host": socket.gethostname(),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "ledger_sha256": ledger,
        "epoch": state.epoch,
        "step": state.step,
        "exit": code,
        "device": str(acc.device),
        "mixed_precision": precision(run.cfg),
        "loader": run.loaders.train[0].kind,
        "peak_rss_mib": peak_rss_mib(),
    }
    if acc.device.type == "cuda":
        record["peak_gpu_mib"] = torch.cuda.max_memory_allocated(acc.device) / 2**20
    record_exit(run.cfg, code, acc.is_main_process)
    folder = Path(run.cfg.run_dir) / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    publish.write_text(folder / f"rank{acc.process_index}.json", json.dumps(record, indent=1))


def record_exit(cfg: RunConfig, code: int, main_process: bool) -> None:
    """``exit_status`` in the run directory, for the Slurm script (which requeues unless it
    says 2 or 3); written whole (temporary file, then rename)."""
    run_dir = Path(cfg.run_dir)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        publish.write_text(run_dir / "exit_status", f"{code}\n")
