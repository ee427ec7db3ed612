"""The prepared GPU run (tools/gpu_check.sh) dry-run on the CPU: every step at a token size."""

import json
import re
import subprocess
import sys

import pytest
from train_helpers import ENV, ROOT

pytestmark = pytest.mark.slow
STEPS = ["gpu_tests", "step_bench", "paper_budget", "loader", "serve"]


def test_step_budgets_fit_one_ten_minute_command():
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    budgets = dict(re.findall(r"^\s*step (\w+) (\d+) ", script, flags=re.M))
    assert list(budgets) == STEPS
    assert sum(int(s) for s in budgets.values()) <= 480


def test_dry_run_runs_every_step_and_writes_its_line(tmp_path):
    out = tmp_path / "out"
    env = {**ENV, "PYTHON": sys.executable, "OUT": str(out), "WORK": str(tmp_path / "work")}
    proc = subprocess.run(
        ["bash", "tools/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["check"] for x in lines] == STEPS
    log = (out / "gpu_check.log").read_text()[-4000:]
    assert all(x.get("exit") == 0 for x in lines), (lines, log)  # none skipped, none failed
    found = {x["check"]: x.get("result") for x in lines}
    step = found["step_bench"]  # python -m gala_scale.bench step, at the CPU's token size
    ddp, zero2 = step["ddp"], step["zero2"]
    assert ddp["images_per_s"] > 0 and zero2["images_per_s"] > 0
    assert zero2["peak_rss_mib_per_process"] > 0 and "peak_gpu_mib_per_process" not in ddp
    # Same seed, same batches, fp32: ZeRO-2 partitions state, not the numbers.
    assert step["precision"] == "no" and step["processes"] == 2
    assert step["zero2_over_ddp_images_per_s"] > 0
    assert abs(ddp["loss"] - zero2["loss"]) < 1e-4 * abs(ddp["loss"])
    runs = found["paper_budget"]["runs"]
    losses = ("ce", "gala_paper")  # the dry run's two; the GPU run has seven
    assert set(runs) == {f"{loss}/seed0" for loss in losses}
    assert all(r["exit"] == 0 and r["epochs_done"] == 1 and "test" in r for r in runs.values())
    assert json.loads((out / "paper_summary.json").read_text())["runs"] == runs
    assert "| gala_paper |" in (out / "paper_results.md").read_text()
    assert (out / "paper_runs.tar.gz.0").stat().st_size > 0
    assert found["loader"]["dali"]["images_per_s"] > 0
    assert found["serve"]["provider"] == "CPUExecutionProvider"
