"""tools/bootstrap.sh refuses a fresh venv on a disk without room for it, before pip starts."""

import os
import subprocess

import pytest
from train_helpers import ROOT

pytestmark = pytest.mark.slow  # it starts bash


def _bootstrap(venv, need: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GALA_VENV": str(venv), "GALA_MIN_FREE_GIB": need}
    script = ROOT / "tools" / "bootstrap.sh"
    return subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_disk_without_room_stops_the_set_up_before_the_venv_is_made(tmp_path):
    venv = tmp_path / "deep" / ".venv"
    proc = _bootstrap(venv, str(10**9))  # more GiB than any disk has
    assert proc.returncode == 1
    assert f"a fresh {venv} needs about {10**9} GiB" in proc.stderr
    assert "GALA_MIN_FREE_GIB=0 skips this check" in proc.stderr
    assert not venv.exists()  # nothing half-made, no pip run


@pytest.mark.parametrize("need", ["9.5", "ten", "-1"])
def test_a_bad_bar_is_refused_by_name(tmp_path, need):
    proc = _bootstrap(tmp_path / ".venv", need)
    assert proc.returncode == 2
    assert f"GALA_MIN_FREE_GIB={need}: expected a whole number of GiB" in proc.stderr
    assert not (tmp_path / ".venv").exists()
