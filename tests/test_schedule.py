"""The learning-rate schedule (gala_scale.recipe.schedule): warm-up then cosine, by step."""

import math

import pytest
import torch

from gala_scale import recipe
from gala_scale.config import ConfigError, load_config


def lrs(epochs: float, warmup: float, steps_per_epoch: int, accum: int = 1) -> list[float]:
    cfg = load_config(
        overrides=[
            "data.shards=x",
            f"train.epochs={epochs}",
            f"optim.warmup_epochs={warmup}",
            f"train.grad_accum_steps={accum}",
        ]
    )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = recipe.schedule(optimizer, cfg, steps_per_epoch)
    out = []
    for _ in range(epochs * steps_per_epoch // accum):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


@pytest.mark.parametrize(("epochs", "warmup", "per_epoch"), [(3, 1, 7), (4, 0, 5), (2, 0.5, 2)])
def test_linear_warmup_then_cosine_to_zero(epochs, warmup, per_epoch):
    got, ramp = lrs(epochs, warmup, per_epoch), int(warmup * per_epoch)
    total = epochs * per_epoch
    for step, lr in enumerate(got):
        if step < ramp:
            want = 0.1 * (step + 1) / ramp
        else:
            want = 0.05 * (1 + math.cos(math.pi * (step - ramp) / (total - ramp)))
        assert lr == pytest.approx(want, abs=1e-12), step
    assert max(got) == pytest.approx(0.1)
    assert all(a > b for a, b in zip(got[ramp:], got[ramp + 1 :], strict=False))  # decays


def test_accumulation_counts_optimizer_steps():
    assert len(lrs(3, 1, 8, accum=2)) == 12


def test_warmup_as_long_as_the_run_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"optim\.warmup_epochs: 3\.0 is not below train\.epochs 3"
    ):
        load_config(overrides=["data.shards=x", "train.epochs=3", "optim.warmup_epochs=3"])
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs: must be >= 0"):
        load_config(overrides=["data.shards=x", "optim.warmup_epochs=-1"])
