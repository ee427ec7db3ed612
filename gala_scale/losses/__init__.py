"""Losses, registered by name: ``create_loss("gala", num_classes=100)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gala_scale.losses.baselines import CrossEntropyLoss, LogitAdjustedLoss, balanced_softmax
from gala_scale.losses.gala import GALALoss

LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": CrossEntropyLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "balanced_softmax": balanced_softmax,
    "gala": GALALoss,
}


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered as ``name`` with ``kwargs`` (its constructor's arguments)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    try:
        return LOSSES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for loss {name!r}: {err}") from err


__all__ = ["LOSSES", "CrossEntropyLoss", "GALALoss", "LogitAdjustedLoss", "create_loss"]
