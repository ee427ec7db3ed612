"""The suite's own limits: a hung test fails in time, naming where its processes wait."""

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

HUNG = """
import subprocess, sys, pytest

@pytest.mark.slow
@pytest.mark.timeout(4)
def test_waits_on_a_child_forever():
    code = "import time\\ndef stuck_in_the_child():\\n    time.sleep(600)\\nstuck_in_the_child()"
    subprocess.run([sys.executable, "-c", code])
"""


@pytest.mark.slow
def test_a_hung_test_fails_with_its_processes_stacks_and_leaves_none(tmp_path):
    (tmp_path / "test_hung.py").write_text(HUNG)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Timeout (>4.0s) from pytest-timeout" in out
    assert "stuck_in_the_child (<string>:3)" in out  # the child's own Python stack
    assert (
        "sleep(600)"
        not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    )
