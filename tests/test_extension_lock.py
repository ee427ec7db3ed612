"""DeepSpeed's JIT-built ops and their locks: a stale lock elsewhere is not the run's, and one in
the run's own folder ends the run within its limit, naming the file (never a silent hang)."""

import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from train_helpers import ENV, debug_overrides, explain, run_accelerate

pytestmark = pytest.mark.slow
SHORT = ("train.epochs=2", "data.test_split=", "data.num_workers=1")


def test_a_stale_lock_in_the_shared_default_folder_does_not_hang_a_deepspeed_run(
    synthetic_shards, tmp_path, port, monkeypatch
):
    """torch's default folder, under a cache root of the test's own (XDG_CACHE_HOME), so that a
    test killed mid-way leaves no lock in the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setitem(ENV, "XDG_CACHE_HOME", str(tmp_path / "cache"))
    lock = Path(cpp_extension._get_build_directory("deepspeed_shm_comm", False)) / "lock"
    assert str(lock).startswith(str(tmp_path))
    lock.touch()
    args = debug_overrides(synthetic_shards, tmp_path / "run", *SHORT)
    proc = run_accelerate(args, port, deepspeed="zero1", timeout=500)
    assert proc.returncode == 0, explain(proc)
    assert lock.exists()  # never the run's: it built (or found its build) elsewhere


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
    # Requeued (no 2 or 3 recorded): under Slurm a restart builds in a folder of its own.
    assert not (tmp_path / "run" / "exit_status").exists()
