"""A stage-2 sweep in one process: ``python -m gala_scale.reproduce --in-process``."""

import json

import pytest
from train_helpers import onnx_test_top1

from gala_scale import reproduce
from gala_scale.export import export

pytestmark = pytest.mark.slow  # its stage-1 run (the session's trained_run) is a process


def test_in_process_sweep_trains_every_loss_and_seed_on_one_cache(
    synthetic_shards, trained_run, tmp_path, capsys
):
    losses = ["ce", "balanced_softmax", "ldam_drw", "gcl"]
    out, report = tmp_path / "sweep", tmp_path / "docs" / "results.md"
    argv = ["--config", "configs/debug.yaml", "--shards", str(synthetic_shards), "--in-process"]
    argv += ["--losses", ",".join(losses), "--seeds", "0", "1", "--out", str(out)]
    argv += ["--report", str(report), "--set", "stage2.enabled=true"]
    argv += ["--set", f"stage2.from_run={trained_run}", "--set", "train.epochs=3"]
    argv += ["--set", "stage2.standardize=true"]  # the cosine head on standardised features
    before = set((trained_run / "features").glob("*/meta.json"))
    assert reproduce.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["runs"]) == {f"{loss}/seed{s}" for loss in losses for s in (0, 1)}
    assert all(r["exit"] == 0 and r["epochs_done"] == 3 for r in summary["runs"].values())
    # One feature cache for all eight runs (the cosine heads' included), beside the stage-1 run.
    assert len(set((trained_run / "features").glob("*/meta.json")) - before) <= 1
    # Named by the imbalance factor the synthetic set was built with (20).
    raw = json.loads((report.parent / "results" / "debug_if20_3ep.json").read_text())
    ce = raw["runs"]["ce"]["0"]["test"]
    assert set(ce) == {
        "plain",
        "PN (val scales)",
        "PN (transductive, paper's protocol)",
        "post-hoc LA (val tau)",
        "tau-norm (val tau)",
    }
    assert len(ce["plain"]["per_class"]) == 6 and 0 <= ce["plain"]["ece"] <= 1
    # The cosine-head losses have no linear weights to tau-normalise.
    assert "tau-norm (val tau)" not in raw["runs"]["gcl"]["1"]["test"]
    text = report.read_text()
    assert "| loss | seeds | post-hoc | overall | many | medium | few | ECE |" in text
    assert "| ldam_drw | 0, 1 | post-hoc LA (val tau) |" in text
    assert (report.parent / "img" / "results_debug_if20_3ep.png").stat().st_size > 1000
    # A stage-2 classifier on a cosine head, on standardised features, back on its backbone:
    # the exported graph scores the test images as the sweep's run did.
    gcl = out / "debug_if20" / "gcl" / "seed0"
    export(gcl, tmp_path / "export", "best")  # checks ONNX Runtime against torch
    top1, images = onnx_test_top1(tmp_path / "export", synthetic_shards)
    scored = json.loads((gcl / "results.json").read_text())
    assert images == scored["test_samples"] and scored["weights"] == "best"
    assert top1 == pytest.approx(scored["test"]["plain"]["top1"], abs=2 / images)
