"""Losses, registered by name: ``create_loss("gala", num_classes=100)``.

Every module of this package that declares losses lists them in ``SPECS``
(:class:`~gala_scale.losses.registry.LossSpec`); they are collected here, in module order, so a
new loss is one new module. The config's ``loss`` section, ``--help-config`` and the trainer's
:func:`build_loss` read the same declarations.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from functools import cache

from gala_scale.losses.baselines import CrossEntropyLoss, LogitAdjustedLoss
from gala_scale.losses.gala import GALALoss
from gala_scale.losses.ledger import GradientLedger
from gala_scale.losses.registry import Loss, LossSpec, Option, check_specs

# Modules of this package that hold machinery, not losses.
_NOT_LOSSES = {"registry", "ledger"}


@cache
def specs() -> dict[str, LossSpec]:
    """Every registered loss by name, from the ``SPECS`` of each module of this package."""
    found = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module not in _NOT_LOSSES:
            found += getattr(importlib.import_module(f"{__name__}.{module}"), "SPECS", [])
    check_specs(found)
    return {spec.name: spec for spec in found}


@cache
def options() -> dict[str, Option]:
    """Every option of every loss, by name (shared names are one option)."""
    return check_specs(list(specs().values()))


def option_users(key: str) -> list[str]:
    """The losses that take the option ``key``."""
    return [name for name, spec in specs().items() if key in spec.options]


def spec(name: str) -> LossSpec:
    if name not in specs():
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(specs()))}")
    return specs()[name]


def create_loss(name: str, **kwargs) -> Loss:
    """Build the loss registered as ``name`` with ``kwargs`` (its options and needs)."""
    declared = spec(name)
    try:
        return declared.build(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for loss {name!r}: {err}") from err


def data_needs(name: str, num_classes: int, class_counts: Sequence[int]) -> dict:
    """The keyword arguments loss ``name`` declares it needs from the data."""
    have = {"num_classes": num_classes, "class_counts": list(class_counts)}
    return {need: have[need] for need in spec(name).needs}


def build_loss(loss_cfg, num_classes: int, class_counts: Sequence[int]) -> Loss:
    """The loss a run's ``loss`` config section names, with that loss's options from the section
    and what it needs from the data. Raises ValueError naming the loss on bad values."""
    declared = spec(loss_cfg.name)
    kwargs = {key: getattr(loss_cfg, key) for key in declared.options}
    kwargs |= data_needs(loss_cfg.name, num_classes, class_counts)
    try:
        return declared.build(**kwargs)
    except ValueError as err:
        raise ValueError(f"loss {loss_cfg.name!r}: {err}") from None


__all__ = [
    "CrossEntropyLoss",
    "GALALoss",
    "GradientLedger",
    "LogitAdjustedLoss",
    "Loss",
    "LossSpec",
    "Option",
    "build_loss",
    "create_loss",
    "data_needs",
    "option_users",
    "options",
    "spec",
    "specs",
]
