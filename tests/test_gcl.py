"""GCL against a per-sample reference written here (given the same noise draw), its randomness
and eval mode, and its registration."""

import math

import pytest
import torch
from loss_checks import assert_gradients_flow, cosine_batch

from gala_scale import losses
from gala_scale.config import ConfigError, load_config
from gala_scale.losses import create_loss

COUNTS = [500, 120, 30, 8, 2]


def clouds(counts, noise_mul):
    """noise_mul x (log n_max - log n_j) / (log n_max - log n_min)."""
    delta = [math.log(max(counts)) - math.log(n) for n in counts]
    return [noise_mul * d / max(delta) if max(delta) else 0.0 for d in delta]


def reference(logits, targets, eps, counts, scale=30.0, margin=0.0, noise_mul=1.0):
    """Mean over rows of sum_k t_k l_ik: l_ik = -log softmax(s (z~_i - margin e_k))_k with
    z~_ij = z_ij - cloud_j |eps_ij|, a Python loop."""
    cloud = clouds(counts, noise_mul)
    total = 0.0
    for row, noise, target in zip(logits.tolist(), eps.tolist(), targets.tolist(), strict=True):
        z = [v - a * abs(e) for v, a, e in zip(row, cloud, noise, strict=True)]
        probs = target if isinstance(target, list) else [k == target for k in range(len(row))]
        for k, t in enumerate(probs):
            x = [scale * (v - margin) if j == k else scale * v for j, v in enumerate(z)]
            top = max(x)
            total += t * (top + math.log(sum(math.exp(v - top) for v in x)) - x[k])
    return total / len(logits)


def batch(seed=0, rows=12):
    return cosine_batch(len(COUNTS), seed, rows)


def noise(shape, seed):
    """The loss's draw: N(0, 1/3) in float32 from a generator, clipped to [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, 1 / 3, generator=gen).clamp(-1, 1)


@pytest.mark.parametrize(
    ("scale", "margin", "noise_mul"), [(30.0, 0.0, 1.0), (30.0, 0.2, 0.5), (20.0, 0.1, 2.0)]
)
def test_gcl_matches_a_per_sample_reference_given_the_noise(scale, margin, noise_mul):
    logits, hard, soft = batch()
    for targets in (hard, soft):
        options = {"scale": scale, "margin": margin, "noise_mul": noise_mul}
        gen = torch.Generator().manual_seed(7)
        loss = create_loss("gcl", class_counts=COUNTS, generator=gen, **options)
        eps = noise(logits.shape, 7)
        want = reference(logits, targets, eps, COUNTS, scale, margin, noise_mul)
        assert loss(logits, targets).item() == pytest.approx(want, rel=1e-5)


def test_eval_mode_draws_no_noise_and_keeps_the_margin():
    logits, hard, soft = batch(1)
    loss = create_loss("gcl", class_counts=COUNTS, margin=0.2).eval()
    zero = torch.zeros(logits.shape)
    for targets in (hard, soft):
        first, second = loss(logits, targets), loss(logits, targets)
        assert first.item() == second.item()
        want = reference(logits, targets, zero, COUNTS, margin=0.2)
        assert first.item() == pytest.approx(want, rel=1e-5)


def test_noise_is_reproducible_through_torch_manual_seed():
    logits, hard, _ = batch(2)
    loss = create_loss("gcl", class_counts=COUNTS).train()
    torch.manual_seed(3)
    first = loss(logits, hard)
    torch.manual_seed(3)
    assert loss(logits, hard).item() == first.item()
    assert loss(logits, hard).item() != first.item()  # a fresh draw each call


def test_clouds_grow_with_rarity_the_head_class_gets_none():
    loss = create_loss("gcl", class_counts=COUNTS, noise_mul=0.5)
    assert loss.cloud.tolist() == pytest.approx(clouds(COUNTS, 0.5))
    assert loss.cloud[0] == 0 and loss.cloud[-1].item() == pytest.approx(0.5)
    shift = loss.perturb(torch.zeros(20000, len(COUNTS)))  # -cloud_j |eps|, eps clipped
    assert bool((shift <= 0).all()) and bool((shift >= -loss.cloud).all())
    mean_abs = (1 / 3) * math.sqrt(2 / math.pi)  # E|N(0, 1/3)|; the clip at 3 sigma is negligible
    assert (-shift.mean(0)).tolist() == pytest.approx((loss.cloud * mean_abs).tolist(), abs=0.01)


def test_equal_counts_mean_no_noise():
    logits, hard, _ = batch(3)
    loss = create_loss("gcl", class_counts=[7] * len(COUNTS))
    assert loss.train()(logits, hard).item() == loss.eval()(logits, hard).item()


def test_gradients_flow_for_hard_and_soft_targets():
    logits, hard, soft = batch(4)
    loss = create_loss("gcl", class_counts=COUNTS, margin=0.1).train()
    assert_gradients_flow(loss, logits, hard, soft.float())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_counts": [3, 0, 1]}, "class_counts must be positive"),
        ({"class_counts": [3, 1], "scale": -1.0}, "scale must be"),
        ({"class_counts": [3, 1], "margin": -0.1}, "margin must be"),
        ({"class_counts": [3, 1], "noise_mul": float("nan")}, "noise_mul must be"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_loss("gcl", **kwargs)


def test_gcl_is_a_config_choice_with_its_options_and_bounds():
    overrides = ["data.shards=x", "loss.name=gcl", "loss.noise_mul=0.5", "loss.margin=0.1"]
    cfg = load_config(overrides=[*overrides, "loss.scale=20"])
    built = losses.build_loss(cfg.loss, len(COUNTS), COUNTS)
    assert (built.noise_mul, built.margin, built.scale) == (0.5, 0.1, 20.0)
    for override, message in [
        ("loss.noise_mul=-1", r"loss\.noise_mul: must be >= 0, got -1"),
        ("loss.margin=-0.5", r"loss\.margin: must be >= 0, got -0\.5"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=["data.shards=x", "loss.name=gcl", override])
