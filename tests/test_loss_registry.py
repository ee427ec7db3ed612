"""The one declaration of each loss, and every consumer that reads it: config, help, trainer."""

import re

import pytest
import torch

from gala_scale import losses
from gala_scale.config import ConfigError, describe, load_config
from gala_scale.losses.registry import Loss, LossSpec, Option, check_specs


def test_every_declared_loss_builds_from_its_defaults_and_trains_a_step():
    counts = [50, 20, 5, 1]
    logits = torch.randn(8, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2])
    cfg = load_config(overrides=["data.shards=x"])
    for name, spec in losses.specs().items():
        cfg.loss.name = name
        loss = losses.build_loss(cfg.loss, 4, counts).train()
        assert isinstance(loss, Loss), name
        assert (loss.ledger is not None) == spec.ledger, name
        for key, option in spec.options.items():
            assert option.problem(f"loss.{key}", option.default) is None, (name, key)
        value = loss(logits, labels)
        assert value.dim() == 0 and torch.isfinite(value), name
        value.backward()
        assert logits.grad.abs().sum() > 0, name
        logits.grad = None


def test_config_help_and_choices_come_from_the_declarations():
    lines = describe()
    for name, spec in losses.specs().items():
        assert any(line.startswith("loss.name") and name in line for line in lines)
        for key, option in spec.options.items():
            line = next(line for line in lines if line.startswith(f"loss.{key} ("))
            assert name in line and option.help in line
    with pytest.raises(ConfigError, match=r"loss\.name: 'nope' is not one of ce, "):
        load_config(overrides=["data.shards=x", "loss.name=nope"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.eps=0", "loss.eps: must be > 0, got 0"),
        ("loss.ledger_init_scale=-1", "loss.ledger_init_scale: must be > 0, got -1"),
        ("loss.variant=eq6", "loss.variant: 'eq6' is not one of reference, paper"),
        ("loss.tau=.nan", "loss.tau: must be a finite number"),
        ("model.name=resnet3", "model.name: unknown model 'resnet3'"),
        ("model.name=timm/efficientnet_lite9", "timm has no architecture 'efficientnet_lite9'"),
    ],
)
def test_bad_loss_options_and_model_names_fail_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=["data.shards=x", override])


def test_a_loss_the_data_cannot_feed_is_named():
    cfg = load_config(overrides=["data.shards=x", "loss.name=balanced_softmax"])
    with pytest.raises(ValueError, match="loss 'balanced_softmax': class_counts must be positive"):
        losses.build_loss(cfg.loss, 3, [3, 0, 1])


def test_declarations_that_disagree_are_refused():
    a = LossSpec("a", "", Loss, options={"tau": Option(1.0, "x")})
    b = LossSpec("b", "", Loss, options={"tau": Option(2.0, "x")})
    with pytest.raises(ValueError, match="option 'tau' of 'b' differs from 'a'"):
        check_specs([a, b])
    with pytest.raises(ValueError, match="declared twice"):
        check_specs([a, a])
    with pytest.raises(ValueError, match="unknown needs"):
        LossSpec("c", "", Loss, needs=("class_prior",))
    with pytest.raises(ValueError, match="reserved"):
        check_specs([LossSpec("d", "", Loss, options={"name": Option("", "")})])


def test_a_checkpoint_from_before_the_ledger_object_loads():
    """Run folders written when the ledger's buffers sat on the loss itself still resume."""
    loss = losses.GALALoss(5, ledger="sum_of_sums").train()
    loss(torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]))
    old = {key.removeprefix("ledger."): value for key, value in loss.state_dict().items()}
    restored = losses.GALALoss(5, ledger="sum_of_sums")
    restored.load_state_dict(old)
    assert torch.equal(restored.ledger.logit_theta, loss.ledger.logit_theta)
    assert torch.equal(restored.ledger.theta_delta, loss.ledger.theta_delta)
