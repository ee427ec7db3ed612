"""Synthetic raw data in the real datasets' formats and class profiles (shards synth --like)."""

import json

import numpy as np
import pytest

from gala_scale.config import load_config
from gala_scale.shards import like
from gala_scale.shards.__main__ import main as shards_main
from gala_scale.shards.manifest import load_manifest

ROOT = like.ROOT
FREQ = like.DATA / "lt_splits" / "cls_freq"
needs_profiles = pytest.mark.skipif(
    not FREQ.is_dir(), reason=f"the real class profiles are not at {FREQ}"
)


@needs_profiles
@pytest.mark.parametrize(
    ("name", "classes", "images"),
    [("inat2018", 8142, 437513), ("imagenet_lt", 1000, 115846), ("places_lt", 365, 62500)],
)
def test_scale_profiles_match_cls_freq(name, classes, images):
    real = json.loads((FREQ / like.PROFILES[name].freq).read_text())
    counts = like.real_counts(name)
    assert len(counts) == classes and sum(counts) == images
    rng = np.random.default_rng(0)
    for k in rng.choice(classes, 50, replace=False):  # scale 1 is the real profile
        assert like.scaled(counts, 1.0)[k] == real[k]
    for scale in (0.5, 0.01, 0.001):
        small = like.scaled(counts, scale)
        assert len(small) == classes and min(small) >= 1  # every class is kept
        order = np.argsort(counts, kind="stable")  # head to tail holds: never more for fewer
        assert np.all(np.diff(np.asarray(small)[order]) >= 0)
        assert small[int(np.argmax(counts))] == round(max(counts) * scale)


def test_scale_inat_categories_have_supercategory_and_kingdom():
    cats = like.categories(8142)
    assert [c["id"] for c in cats] == list(range(8142))
    assert {c["kingdom"] for c in cats} >= {"Plantae", "Animalia", "Fungi"}
    assert len({c["supercategory"] for c in cats}) == 14
    assert cats[0]["name"].startswith("Plantae")


@needs_profiles
@pytest.mark.parametrize(
    ("name", "classes", "splits"),
    [
        ("inat2018", 8142, {"train", "val"}),
        ("imagenet_lt", 1000, {"train", "val", "test"}),
        ("places_lt", 365, {"train", "val", "test"}),
    ],
)
@pytest.mark.slow
def test_scale_raw_data_builds_with_the_real_builders(tmp_path, capsys, name, classes, splits):
    raw, out = tmp_path / "raw", tmp_path / "set"
    argv = ["synth", "--like", name, "--scale", "0.002", "--root", str(raw)]
    assert shards_main([*argv, "--image-size", "16x12", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "next: python -m gala_scale.shards build" in printed
    build = like.build_command(name, raw, out)
    assert shards_main([*build, "--workers", "2"]) == 0
    manifest = load_manifest(out)
    assert manifest["num_classes"] == classes and set(manifest["splits"]) == splits
    expected = like.scaled(like.real_counts(name), 0.002)
    if name == "inat2018":  # the builder orders classes by category id, which is the label here
        names = manifest["class_names"]
        assert names[0] == "Plantae species 0000" and names[-1] == "Bacteria species 8141"
    assert manifest["splits"]["train"]["class_counts"] == expected
    assert all(n >= 1 for n in manifest["splits"]["val"]["class_counts"])
    # The shipped config of the dataset names splits the set has (iNat 2018 has no test split).
    data = load_config(ROOT / "configs" / f"{name}.yaml").data
    assert {data.train_split, data.val_split, data.test_split} <= set(manifest["splits"])


@pytest.mark.parametrize("classes", [10, 8142])
def test_scale_plots_stay_readable(tmp_path, monkeypatch, classes):
    from gala_scale import plots

    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.update({path.stem: fig}))
    rng = np.random.default_rng(0)
    counts = sorted(rng.integers(2, 1000, classes), reverse=True)
    acc = rng.uniform(0, 1, (3, classes))
    acc[0, 5] = np.nan  # a class without test images
    plots.per_class_accuracy(counts, acc[0], acc[1], tmp_path / "per_class_accuracy.png")
    plots.positive_predictions(counts, rng.integers(0, 9, classes), acc[1], tmp_path / "pp.png")
    plots.comparison(counts, {"a": acc[0], "b": acc[1]}, tmp_path / "comparison.png")
    history = np.cumsum(rng.uniform(0, 1, (4, classes)), axis=0)
    plots.ledger({"theta": history, "phi": history}, counts, tmp_path / "ledger.png")
    points = min(classes, plots.MAX_POINTS)
    for name in ("per_class_accuracy", "comparison"):
        ax = figures[name].axes[0]
        assert all(len(line.get_xdata()) == points for line in ax.get_lines()), name
        assert len(ax.get_xticklabels()) <= plots.MAX_TICK_LABELS, name
    assert len(figures["pp"].axes[0].patches) == 2 * points
    lines = figures["ledger"].axes[0].get_lines()
    assert len(lines) == (3 if classes > plots.MAX_LEDGER_LINES else classes)
