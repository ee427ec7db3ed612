"""Mixup and CutMix: the batches, their soft targets, and GALA's soft-target ledger in a run."""

import numpy as np
import pytest
import torch
from shard_fixtures import build_small_synthetic
from train_helpers import debug_overrides, explain, ledger, run_accelerate, run_single

from gala_scale.data.mixing import Mixing, mix_batch, mixed

K = 5


def batch(seed: int = 0, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=gen), torch.randint(0, K, (n,), generator=gen)


def test_mixup_mixes_images_and_targets_with_one_weight():
    images, labels = batch()
    out, targets = mix_batch(images, labels, Mixing(mixup=0.4), K, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    rng.random()  # the mixed-or-not draw
    lam = rng.beta(0.4, 0.4)
    perm = torch.from_numpy(rng.permutation(8))
    torch.testing.assert_close(out, images * lam + images[perm] * (1 - lam))
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    onehot = torch.eye(K)
    torch.testing.assert_close(targets, onehot[labels] * lam + onehot[labels[perm]] * (1 - lam))


def test_cutmix_target_weight_is_the_area_kept():
    # Sample i is the constant image i, so every pixel says where it came from.
    images = torch.arange(K, dtype=torch.float32).view(K, 1, 1, 1).expand(K, 3, 16, 16)
    labels = torch.arange(K)  # distinct: target[i, i] is the weight of the kept image
    for seed in range(6):
        out, targets = mix_batch(images, labels, Mixing(cutmix=1.0), K, np.random.default_rng(seed))
        torch.testing.assert_close(targets.sum(1), torch.ones(K))
        for i in range(K):
            own = (out[i] == i).all(0).float().mean().item()
            if own < 1:  # its partner is another image: a box of it was pasted
                (partner,) = set(out[i].unique().long().tolist()) - {i}
                assert targets[i, i].item() == pytest.approx(own)
                assert targets[i, partner].item() == pytest.approx(1 - own)


def test_mixing_is_seeded_by_step_so_a_resume_mixes_the_same():
    mixing = Mixing(mixup=0.2, cutmix=1.0, prob=0.8)
    stream = [batch(s) for s in range(6)]
    whole = list(mixed(stream, mixing, K, seed=0, epoch=2, first_step=0, rank=1))
    again = list(mixed(stream[3:], mixing, K, seed=0, epoch=2, first_step=3, rank=1))
    for (a, ta), (b, tb) in zip(whole[3:], again, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    other_rank = list(mixed(stream, mixing, K, seed=0, epoch=2, first_step=0, rank=0))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(whole, other_rank, strict=True))
    off = list(mixed(stream, Mixing(), K, seed=0, epoch=2, first_step=0, rank=1))
    assert all(torch.equal(y, s[1]) for (_, y), s in zip(off, stream, strict=True))
    with pytest.raises(ValueError, match="alpha >= 0"):
        Mixing(mixup=-1)


@pytest.mark.slow
def test_mixed_runs_feed_galas_soft_ledger_and_two_ranks_mix_as_one_process(tmp_path, port):
    shards = build_small_synthetic(tmp_path / "synthetic")
    extra = ("data.mixup=0.4", "data.cutmix=1.0", "train.sync_every_steps=1")
    single = tmp_path / "single"
    proc = run_single(debug_overrides(shards, single, *extra, "train.emulate_world=2"))
    assert proc.returncode == 0, explain(proc)
    one = ledger(single)
    # Hard labels give theta == phi exactly; soft targets split a sample's gradient unevenly.
    assert not torch.allclose(one["theta"], one["phi"]) and bool((one["theta"] > 0).all())
    ddp = tmp_path / "ddp"
    proc = run_accelerate(debug_overrides(shards, ddp, *extra), port)
    assert proc.returncode == 0, explain(proc)
    for key, value in ledger(ddp).items():
        torch.testing.assert_close(value, one[key], rtol=1e-6, atol=1e-4)
