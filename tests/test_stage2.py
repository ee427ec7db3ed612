"""Two-stage training: the feature cache, its samplers, and stage 2 through the trainer."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import debug_overrides, explain, ledger, results, run_single

from gala_scale.data import PAD_LABEL
from gala_scale.export import export
from gala_scale.stage2 import FeatureLoader, Standardized, feature_statistics

LABELS = np.repeat(np.arange(4), [64, 16, 8, 2])  # 90 samples, imbalance 32


def features(n: int = len(LABELS), dim: int = 3) -> np.ndarray:
    return np.arange(n * dim, dtype=np.float16).reshape(n, dim)


def drawn(sampler: str, epochs: int = 40) -> np.ndarray:
    loader = FeatureLoader([(features(), LABELS)], 10, True, 0, 1, 0, "cpu", sampler)
    counts = np.zeros(4)
    for epoch in range(epochs):
        for _, y in loader.epoch(epoch):
            counts += np.bincount(y.numpy(), minlength=4)
    return counts / counts.sum()


def test_samplers_draw_classes_as_they_say():
    np.testing.assert_allclose(drawn("instance"), np.bincount(LABELS) / 90, atol=0.01)
    np.testing.assert_allclose(drawn("class_balanced"), [0.25] * 4, atol=0.03)
    root = np.sqrt(np.bincount(LABELS))
    np.testing.assert_allclose(drawn("sqrt"), root / root.sum(), atol=0.03)


def test_feature_batches_split_over_ranks_resume_and_pad():
    views = [(features(), LABELS)]
    ranks = [FeatureLoader(views, 8, True, r, 2, 3, "cpu") for r in range(2)]
    seen = [torch.cat([x[:, 0] for x, _ in loader.epoch(1)]) for loader in ranks]
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0  # disjoint
    assert ranks[0].steps_per_epoch == 5 and len(seen[0]) == 40
    whole = list(ranks[0].epoch(2))
    for (a, ya), (b, yb) in zip(whole[3:], ranks[0].epoch(2, start_step=3), strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    # Evaluation: 3 batches of 16 a rank, every sample once, the 6 missing to 96 padded.
    firsts = []
    for rank in range(2):
        loader = FeatureLoader(views, 16, False, rank, 2, 0, "cpu")
        x, y = (torch.cat(parts) for parts in zip(*loader.epoch(0), strict=True))
        assert len(y) == 48
        firsts += x[y != PAD_LABEL, 0].tolist()
    assert sorted(firsts) == features()[:, 0].astype(np.float32).tolist()


@pytest.fixture(scope="session")
def stage1(synthetic_shards, trained_run):
    return synthetic_shards, trained_run


def stage2_args(shards, run_dir, *extra):
    return debug_overrides(shards, run_dir, "stage2.enabled=true", "train.epochs=4", *extra)


@pytest.mark.slow
def test_stage2_of_a_run_caches_features_once_and_exports_on_the_backbone(stage1, tmp_path):
    shards, first = stage1
    gala = tmp_path / "gala"
    args = (f"stage2.from_run={first}", "stage2.views=1", "stage2.sampler=class_balanced")
    args += ("stage2.standardize=true",)
    before = set((first / "features").iterdir()) if (first / "features").exists() else set()
    proc = run_single(stage2_args(shards, gala, *args, "loss.name=gala"))
    assert proc.returncode == 0, explain(proc)
    assert "stage2 features: train_view1" in proc.stderr
    versions = sorted((first / "features").iterdir())
    # One version, named by its key's hash, beside those other tests of the shared run made;
    # no temporary, partial or lock left.
    (cache,) = set(versions) - before
    assert not [p for p in versions if p.name.startswith(".")]
    key = json.loads((cache / "meta.json").read_text())["key"]
    assert key["config"]["stage2.views"] == 1 and len(key["weights_sha256"]) == 64
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    train0 = np.load(cache / "train_view0.features.npy")
    assert train0.dtype == np.float16 and train0.shape == (256, 32)  # the tiny model's 32
    trained = load_file(gala / "final" / "model.safetensors")  # standardised, as asked
    assert set(trained) == {"fc.weight", "fc.bias", "mean", "std"}
    np.testing.assert_allclose(
        trained["mean"].numpy(), train0.astype(np.float64).mean(0), atol=1e-3
    )
    assert ledger(gala)["theta"].sum() > 0 and "test" in results(gala)
    assert (gala / "plots" / "ledger.png").is_file()

    # A second stage-2 run on the same backbone computes nothing.
    bs = tmp_path / "balanced_softmax"
    proc = run_single(stage2_args(shards, bs, *args, "loss.name=balanced_softmax"))
    assert proc.returncode == 0, explain(proc)
    assert "stage2 features:" not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    assert sorted((first / "features").iterdir()) == versions
    assert results(bs)["test"] != results(gala)["test"]

    out = tmp_path / "export"
    export(gala, out, "final")  # compares ONNX Runtime with the backbone + new head in torch
    assert json.loads((out / "artifact.json").read_text())["num_classes"] == 6


@pytest.mark.slow
def test_stage2_of_a_pretrained_file_caches_in_its_own_run(stage1, tmp_path):
    shards, first = stage1
    weights = tmp_path / "backbone.safetensors"
    save_file(load_file(first / "final" / "model.safetensors"), weights)
    run_dir = tmp_path / "run"
    proc = run_single(stage2_args(shards, run_dir, f"model.pretrained={weights}"))
    assert proc.returncode == 0, explain(proc)
    (version,) = (run_dir / "features").iterdir()
    assert (version / "test.features.npy").is_file()
    proc = run_single(stage2_args(shards, tmp_path / "bad", "stage2.from_run=/nonexistent"))
    assert proc.returncode == 2 and "/nonexistent/final/model.safetensors: missing" in proc.stderr


def test_standardized_classifier_folds_into_one_linear_layer_on_raw_features():
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(300, 5)) * [1, 10, 100, 0.01, 3] + [5, -2, 40, 0, 1]).astype(
        np.float16
    )
    features[:, 3] = 7  # a constant dimension: std 1, not a division by zero
    mean, std = feature_statistics(features, rows=64)  # in blocks, as from a memory map
    exact = features.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), exact.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), np.where(exact.std(0) > 0, exact.std(0), 1), rtol=1e-4)
    torch.manual_seed(0)
    model = Standardized(torch.nn.Linear(5, 4), mean, std)
    x = torch.from_numpy(features.astype(np.float32))
    standardised = (x - x.mean(0)) / torch.where(
        x.std(0, unbiased=False) > 0, x.std(0, unbiased=False), 1
    )
    torch.testing.assert_close(model(x), model.fc(standardised), atol=1e-4, rtol=1e-4)
    folded = model.folded()
    assert isinstance(folded, torch.nn.Linear)
    torch.testing.assert_close(folded(x), model(x), atol=1e-3, rtol=1e-4)
    # And back: a raw head (stage2.reset_head: false) unfolded computes what it computed.
    raw = torch.nn.Linear(5, 4)
    model.unfold_(raw)
    torch.testing.assert_close(model(x), raw(x), atol=1e-3, rtol=1e-4)
