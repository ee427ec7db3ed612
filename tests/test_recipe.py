"""The recipe's engineering options (gala_scale.recipe) run on the CPU and leave the loss as it
was without them."""

import json

import pytest
import torch
from train_helpers import debug_overrides, explain, run_single, weights

pytestmark = pytest.mark.slow
QUICK = ("train.epochs=2", "data.test_split=", "train.keep_checkpoints=1")


@pytest.fixture(scope="session")
def shards(synthetic_shards):
    return synthetic_shards


def train(shards, run_dir, *options: str) -> list[dict]:
    proc = run_single(debug_overrides(shards, run_dir, *QUICK, *options))
    assert proc.returncode == 0, explain(proc)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    return run_dir, train(shards, run_dir)


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.mark.parametrize(
    ("option", "rel"),
    [
        ("train.channels_last=on", 1e-4),
        ("optim.implementation=fused", 1e-5),
        ("optim.implementation=for_loop", 1e-5),
        ("train.compile=true", 1e-3),
    ],
)
def test_option_leaves_the_loss_as_it_was(shards, baseline, tmp_path, option, rel):
    assert losses(train(shards, tmp_path / "run", option)) == pytest.approx(
        losses(baseline[1]), rel=rel
    )


def test_accumulating_two_half_batches_trains_like_the_whole_batch(shards, tmp_path):
    whole = train(shards, tmp_path / "whole", "loss.name=ce")
    halves = train(
        shards,
        tmp_path / "halves",
        "loss.name=ce",
        "data.batch_size=16",
        "train.grad_accum_steps=2",
    )
    # The same optimizer steps a epoch, so the same schedule; the loss agrees within 2 %.
    assert [r["lr"] for r in halves] == pytest.approx([r["lr"] for r in whole], rel=0.05)
    assert losses(halves) == pytest.approx(losses(whole), rel=0.02)
    assert losses(halves) != losses(whole)  # the micro-batches really ran


def test_linear_lr_scaling_scales_with_the_global_batch(shards, baseline, tmp_path):
    scaled = train(shards, tmp_path / "run", "optim.lr_scaling=linear", "optim.base_batch_size=64")
    for mine, base in zip(scaled, baseline[1], strict=True):
        assert mine["lr"] == pytest.approx(base["lr"] * 32 / 64)


def test_weight_average_is_evaluated_saved_and_checkpointed(shards, baseline, tmp_path):
    run_dir = tmp_path / "ema"
    records = train(shards, run_dir, "train.ema_decay=0.9")
    assert losses(records) == losses(baseline[1])  # the average never touches training
    raw = weights(baseline[0], "final")  # the same training without the average
    final = weights(run_dir, "final")
    assert set(final) >= set(raw)
    assert any(not torch.equal(final[k], raw[k]) for k in raw)
    checkpoint = next((run_dir / "checkpoints").iterdir())
    assert len(list(checkpoint.glob("custom_checkpoint_*.pkl"))) == 3  # state, ledger, average


def test_sync_bn_without_cuda_is_a_config_error(shards, tmp_path):
    proc = run_single(debug_overrides(shards, tmp_path / "r", "train.sync_bn=true"))
    assert proc.returncode == 2 and "train.sync_bn: SyncBatchNorm needs CUDA" in proc.stderr
