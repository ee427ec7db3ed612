"""The README's main job, end to end (shortened to 2 epochs a run)."""

import json
import subprocess
import sys

import pytest
from train_helpers import ENV, ROOT

pytestmark = pytest.mark.slow


def test_main_job_end_to_end(tmp_path):
    out, shards = tmp_path / "quickstart", tmp_path / "synthetic"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gala_scale.quickstart",
            "--out",
            str(out),
            "--shards",
            str(shards),
            "--epochs",
            "2",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout[proc.stdout.index("== results") :]
    rows = {line[:44].strip(): line[44:].split() for line in table.splitlines()[4:11]}
    assert len(rows) == 7 and "GALA served (ONNX, stored PN scales)" in rows
    # The served model with its stored scales scores what the trainer measured for it.
    assert rows["GALA served (ONNX, stored PN scales)"] == rows["GALA: PN, val scales, tau 1"]
    assert (out / "comparison.png").stat().st_size > 1000
    for run in ("ce", "gala"):
        assert json.loads((out / run / "results.json").read_text())["test_samples"] == 1000
        assert (out / run / "plots" / "ledger.png").exists() or run == "ce"
    assert (out / "served_predictions.jsonl").read_text().count("\n") == 1000
