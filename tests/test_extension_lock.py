"""DeepSpeed's JIT-built ops and their locks: a stale lock elsewhere is not the run's, and one in
the run's own folder ends the run within its limit, naming the file (never a silent hang)."""

import os
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from train_helpers import ENV, debug_overrides, explain, run_accelerate

from gala_scale.rundir import EXIT_FAILED

pytestmark = pytest.mark.slow
SHORT = ("train.epochs=2", "data.test_split=", "data.num_workers=1")


def torch_default_build_dir(name: str) -> Path:
    """Where torch builds ``name`` when TORCH_EXTENSIONS_DIR is unset: shared by every venv
    and torch of this user."""
    saved = os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    try:
        return Path(cpp_extension._get_build_directory(name, False))
    finally:
        if saved is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = saved


def test_a_stale_lock_in_the_shared_default_folder_does_not_hang_a_deepspeed_run(
    synthetic_shards, tmp_path, port
):
    lock = torch_default_build_dir("deepspeed_shm_comm") / "lock"
    planted = not lock.exists()
    lock.touch()
    try:
        args = debug_overrides(synthetic_shards, tmp_path / "run", *SHORT)
        proc = run_accelerate(args, port, deepspeed="zero1", timeout=500)
    finally:
        if planted:
            lock.unlink()
    assert proc.returncode == 0, explain(proc)


def test_a_stale_lock_in_the_runs_own_folder_ends_it_naming_the_file(
    synthetic_shards, tmp_path, port, monkeypatch
):
    own = tmp_path / "extensions"
    lock = own / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setitem(ENV, "TORCH_EXTENSIONS_DIR", str(own))
    monkeypatch.setitem(ENV, "GALA_EXTENSION_WAIT_S", "5")
    start = time.monotonic()
    proc = run_accelerate(
        debug_overrides(synthetic_shards, tmp_path / "run", *SHORT), port, deepspeed="zero1"
    )
    assert proc.returncode != 0 and time.monotonic() - start < 180, explain(proc)
    assert f"waited 5 s on its lock ({lock})" in proc.stderr, explain(proc)
    assert (tmp_path / "run" / "exit_status").read_text() == f"{EXIT_FAILED}\n"
