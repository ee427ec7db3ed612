"""Class-balanced cross-entropy against a per-sample reference written here; its registration."""

import math

import pytest
import torch
from loss_checks import assert_gradients_flow

from gala_scale import losses
from gala_scale.config import ConfigError, load_config
from gala_scale.losses import create_loss

COUNTS = [500, 120, 30, 8, 2]


def class_weights(counts, beta):
    """(1 - beta) / (1 - beta^n), scaled to sum to the number of classes."""
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [len(counts) * v / sum(raw) for v in raw]


def reference(logits, targets, counts, beta):
    """Mean over rows of -sum_k t_k w_k log p_k, a Python loop (hard targets: t one-hot)."""
    weights = class_weights(counts, beta)
    total = 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        top = max(row)
        norm = top + math.log(sum(math.exp(z - top) for z in row))
        probs = target if isinstance(target, list) else [k == target for k in range(len(row))]
        total -= sum(t * w * (z - norm) for z, t, w in zip(row, probs, weights, strict=True))
    return total / len(logits)


def batch(seed=0, rows=12):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, len(COUNTS), generator=gen, dtype=torch.float64) * 3
    hard = torch.randint(0, len(COUNTS), (rows,), generator=gen)
    soft = torch.softmax(torch.randn(rows, len(COUNTS), generator=gen, dtype=torch.float64), 1)
    return logits, hard, soft


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999, 0.9999])
def test_class_balanced_matches_a_per_sample_reference(beta):
    logits, hard, soft = batch()
    loss = create_loss("class_balanced", class_counts=COUNTS, beta=beta)
    for targets in (hard, soft):
        got = loss(logits, targets)
        assert got.item() == pytest.approx(reference(logits, targets, COUNTS, beta), rel=1e-5)


def test_weights_sum_to_k_favour_rare_classes_and_beta_zero_is_cross_entropy():
    loss = create_loss("class_balanced", class_counts=COUNTS, beta=0.999)
    weights = loss.class_weights.tolist()
    assert sum(weights) == pytest.approx(len(COUNTS))
    assert weights == sorted(weights)  # counts fall, weights rise
    logits, hard, _ = batch(1)
    plain = create_loss("class_balanced", class_counts=COUNTS, beta=0.0)(logits, hard)
    ce = torch.nn.functional.cross_entropy(logits, hard)
    assert plain.item() == pytest.approx(ce.item(), rel=1e-6)


def test_the_batch_loss_is_the_plain_mean_not_the_weighted_mean():
    """The authors' reduction divides by the batch size: a batch of one class is w_y x CE."""
    logits, _, _ = batch(2, rows=6)
    labels = torch.full((6,), 4)
    loss = create_loss("class_balanced", class_counts=COUNTS, beta=0.999)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert loss(logits, labels).item() == pytest.approx(loss.class_weights[4].item() * ce.item())


def test_gradients_flow_for_hard_and_soft_targets():
    logits, hard, soft = batch(3)
    loss = create_loss("class_balanced", class_counts=COUNTS)
    assert_gradients_flow(loss, logits, hard, soft.float())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_counts": [3, 0, 1]}, "class_counts must be positive"),
        ({"class_counts": [3]}, "class_counts must be a 1-D sequence of >= 2"),
        ({"class_counts": [[3, 1]]}, "class_counts must be a 1-D"),
        ({"class_counts": [3, 1], "beta": 1.0}, "beta must be in"),
        ({"class_counts": [3, 1], "beta": -0.5}, "beta must be in"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_loss("class_balanced", **kwargs)


def test_bad_shapes_raise():
    loss = create_loss("class_balanced", class_counts=COUNTS)
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, 5\)"):
        loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        loss(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))


def test_class_balanced_is_a_config_choice_with_its_bound():
    cfg = load_config(overrides=["data.shards=x", "loss.name=class_balanced", "loss.beta=0.99"])
    assert (cfg.loss.name, cfg.loss.beta) == ("class_balanced", 0.99)
    built = losses.build_loss(cfg.loss, len(COUNTS), COUNTS)
    assert built.beta == 0.99
    expected = class_weights(COUNTS, 0.99)
    assert built.class_weights.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match=r"loss\.beta: must be < 1, got 1"):
        load_config(overrides=["data.shards=x", "loss.name=class_balanced", "loss.beta=1"])
