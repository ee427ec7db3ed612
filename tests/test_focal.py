"""The focal loss against a per-sample reference written here, and its registration."""

import math

import pytest
import torch

from gala_scale.config import ConfigError, load_config
from gala_scale.losses import create_loss


def reference(logits, targets, gamma):
    """Per sample: -sum_k t_k (1 - p_k)^gamma log p_k, a Python loop."""
    total = 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        top = max(row)
        norm = top + math.log(sum(math.exp(z - top) for z in row))
        weights = target if isinstance(target, list) else [k == target for k in range(len(row))]
        for z, t in zip(row, weights, strict=True):
            p = math.exp(z - norm)
            total -= t * (1 - p) ** gamma * (z - norm)
    return total / len(logits)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_a_per_sample_reference(gamma):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=gen, dtype=torch.float64) * 3
    hard = torch.randint(0, 7, (16,), generator=gen)
    soft = torch.softmax(torch.randn(16, 7, generator=gen, dtype=torch.float64), 1)
    loss = create_loss("focal", gamma=gamma)
    for targets in (hard, soft):
        got = loss(logits, targets.float() if targets.dim() == 2 else targets)
        assert got.item() == pytest.approx(reference(logits, targets, gamma), rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy_and_gradients_flow():
    logits = torch.tensor([[10.0, -10.0], [0.3, 0.1]], requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = create_loss("focal", gamma=0.0)(logits, labels)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    create_loss("focal", gamma=2.0)(logits, labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_focal_is_a_config_choice_with_its_bound(tmp_path):
    cfg = load_config(overrides=[f"data.shards={tmp_path}", "loss.name=focal", "loss.gamma=1"])
    assert (cfg.loss.name, cfg.loss.gamma) == ("focal", 1.0)
    with pytest.raises(ConfigError, match=r"loss\.gamma: must be >= 0, got -1"):
        load_config(overrides=[f"data.shards={tmp_path}", "loss.name=focal", "loss.gamma=-1"])
