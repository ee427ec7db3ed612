"""The README's main job, end to end (shortened to 2 epochs a run)."""

import json
import statistics

import pytest
from train_helpers import ROOT, run_module

from gala_scale.reproduce import tables

pytestmark = pytest.mark.slow


def test_main_job_end_to_end(tmp_path):
    out, shards = tmp_path / "quickstart", tmp_path / "synthetic"
    args = ["--out", str(out), "--shards", str(shards), "--epochs", "2"]
    proc = run_module("gala_scale.quickstart", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout[proc.stdout.index("== results") :]
    rows = {line[:44].strip(): line[44:].split() for line in table.splitlines()[4:15]}
    assert len(rows) == 11 and "GALA served (ONNX, stored PN scales)" in rows
    # The served model with its stored scales scores what the trainer measured for it.
    assert rows["GALA served (ONNX, stored PN scales)"] == rows["GALA: PN, val scales, tau 1"]
    assert (out / "comparison.png").stat().st_size > 1000
    for run in ("ce", "gala"):
        assert json.loads((out / run / "results.json").read_text())["test_samples"] == 1000
        assert (out / run / "plots" / "ledger.png").exists() or run == "ce"
    assert (out / "served_predictions.jsonl").read_text().count("\n") == 1000


def _tiny_cifar_folder(root, classes: int = 10, train: int = 60, test: int = 5):
    """An ImageFolder with train/ and test/ shaped like CIFAR-10 (32x32 JPEGs, noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for pool, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / pool / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def test_reproduce_builds_trains_and_reports_under_the_factor_used(tmp_path):
    root = _tiny_cifar_folder(tmp_path / "cifar")
    out, report = tmp_path / "out", tmp_path / "docs" / "results.md"
    argv = ["--config", str(ROOT / "configs" / "cifar10_lt_if100.yaml"), "--root", str(root)]
    argv += ["--imbalance-factor", "10", "--epochs", "1", "--losses", "ce,gala_counts"]
    argv += ["--seeds", "0", "1", "--set", "model.name=tiny", "--val-per-class", "5"]
    argv += ["--out", str(out), "--report", str(report)]
    proc = run_module("gala_scale.reproduce", *argv, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "shards" / "cifar10_lt_if10" / "manifest.json").read_text())
    assert manifest["build"]["imbalance_factor"] == 10
    text = report.read_text()
    assert "## cifar10_lt_if10, 1 epochs (tiny, seeds 0, 1)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert sum(line.startswith(("| ce |", "| gala_counts |")) for line in rows) == 10
    assert (report.parent / "img" / "results_cifar10_lt_if10_1ep.png").stat().st_size > 1000
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["reproduce"] == "cifar10_lt_if10"
    assert set(summary["runs"]) == {
        "ce/seed0",
        "ce/seed1",
        "gala_counts/seed0",
        "gala_counts/seed1",
    }
    for seed in (0, 1):
        run = out / "cifar10_lt_if10" / "gala_counts" / f"seed{seed}"
        assert f"seed: {seed}" in (run / "config.yaml").read_text()
        assert "ledger_init: counts" in (run / "config.yaml").read_text()
    ce = summary["runs"]["ce/seed0"]
    assert ce["exit"] == 0 and ce["epochs_done"] == 1
    assert len(ce["test"]) == 5 and 0 <= ce["test"]["plain"]["top1"] <= 1
    assert set(ce["test"]) >= {"post-hoc LA (val tau)", "tau-norm (val tau)"}
    # The raw figures behind the table, and the table regenerated from them alone.
    raw = json.loads((report.parent / "results" / "cifar10_lt_if10_1ep.json").read_text())
    assert raw["seeds"] == [0, 1] and raw["val_from"] == "reserved"
    firsts = [raw["runs"]["ce"][s]["test"]["plain"]["top1"] for s in ("0", "1")]
    mean, std = statistics.mean(firsts) * 100, statistics.stdev([100 * f for f in firsts])
    assert f"| ce | 0, 1 | plain | {mean:.1f} ± {std:.1f} |" in text
    again = run_module(
        "gala_scale.reproduce",
        "--tables",
        str(report.parent / "results" / "cifar10_lt_if10_1ep.json"),
    )
    assert again.returncode == 0
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == rows
    assert "Raw figures: `results/cifar10_lt_if10_1ep.json`" in again.stdout
    assert "Raw figures: `results/renamed.json`" in "\n".join(tables(raw, "renamed.json"))
    # A second call keeps the finished runs instead of running or evaluating them again.
    repeat = run_module("gala_scale.reproduce", *argv, timeout=300)
    assert repeat.returncode == 0, repeat.stderr[-3000:]
    assert repeat.stdout.count("finished by an earlier call, kept") == 4
    # A raw results file joins a new call's table: its runs are kept, only a new seed is trained.
    stored = report.parent / "results" / "cifar10_lt_if10_1ep.json"
    keep = tmp_path / "kept.json"
    keep.write_text(stored.read_text())
    head, tail = argv[: argv.index("--epochs")], argv[argv.index("--set") :]
    third = [*head, "--epochs", "1", "--losses", "ce", "--seeds", "0", "1", "2", *tail]
    third += ["--keep", str(keep)]
    joined = run_module("gala_scale.reproduce", *third, timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert joined.stdout.count(f"kept from {keep}") == 2
    assert (out / "cifar10_lt_if10" / "ce" / "seed2" / "results.json").is_file()
    merged, before = json.loads(stored.read_text()), json.loads(keep.read_text())
    # ce over seeds 0-2; gala_counts, not asked for, stays in the table with its seeds 0 and 1.
    assert merged["seeds"] == [0, 1, 2] and list(merged["runs"]) == ["ce", "gala_counts"]
    assert merged["runs"]["gala_counts"] == before["runs"]["gala_counts"]
    assert "| gala_counts | 0, 1 | plain |" in report.read_text()
    for seed in ("0", "1"):
        assert merged["runs"]["ce"][seed] == before["runs"]["ce"][seed]
    # Runs made under another set-up do not: the field at fault is named.
    other = [*head, "--epochs", "2", *third[third.index("--losses") :]]
    refused = run_module("gala_scale.reproduce", *other, timeout=300)
    assert refused.returncode != 0 and "field 'epochs' is 1" in refused.stderr
