"""One declaration per loss: its name, options (with help and bounds), needs and constructor.

Each module of ``gala_scale.losses`` that defines a loss also defines ``SPECS``, a list of
:class:`LossSpec`. The package collects them (:func:`gala_scale.losses.specs`), and every consumer
reads that one list: the config's ``loss`` section and its choices and bounds, ``--help-config``,
the trainer's :func:`build_loss` and :func:`gala_scale.losses.create_loss`. Adding a loss is one
new module with its ``SPECS`` (docs/architecture.md).

An option name shared by two losses must mean the same thing (same default, help and bounds):
the config's ``loss`` section is flat (``loss.tau``, ``loss.lambda1``), as shipped configs write it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

# What a loss can ask of the run, beyond its options: each name is a constructor keyword.
NEEDS = ("num_classes", "class_counts")


class Loss(nn.Module):
    """Base of every registered loss: ``loss(logits, targets)`` -> the mean loss (a scalar).

    ``targets`` are class indices ``(B,)`` or target probabilities ``(B, K)``. ``ledger`` is the
    loss's :class:`~gala_scale.losses.ledger.GradientLedger` when it keeps one (GALA), else None:
    the trainer syncs, checkpoints and logs it through that object and nothing else.
    ``check_finite``: whether the loss raises on a non-finite value itself (one device-to-host
    sync a call); the trainer turns it off and checks through its Guard instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_module("ledger", None)
        self.check_finite = True

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each training epoch (``epoch`` counts from 0, of
        ``epochs``), on every rank and again after a resume: for losses whose form changes over
        the run (deferred re-weighting). Nothing by default."""


@dataclass(frozen=True)
class Option:
    """A loss option: default, one-line help, and the values it admits (choices or bounds)."""

    default: bool | int | float | str
    help: str
    choices: tuple[str, ...] = ()
    gt: float | None = None  # value > gt
    ge: float | None = None  # value >= ge
    lt: float | None = None  # value < lt

    def problem(self, key: str, value) -> str | None:
        """What is wrong with ``value`` for ``key`` (None when nothing is)."""
        if self.choices:
            if value not in self.choices:
                return f"{key}: {value!r} is not one of {', '.join(self.choices)}"
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        if not math.isfinite(value):
            return f"{key}: must be a finite number, got {value}"
        for bound, fails, words in (
            (self.gt, lambda v, b: v <= b, "> {:g}"),
            (self.ge, lambda v, b: v < b, ">= {:g}"),
            (self.lt, lambda v, b: v >= b, "< {:g}"),
        ):
            if bound is not None and fails(value, bound):
                return f"{key}: must be {words.format(bound)}, got {value:g}"
        return None

    def describe(self) -> str:
        """The help with what the option admits, for ``--help-config``."""
        admits = [f"> {self.gt:g}" if self.gt is not None else ""]
        admits += [f">= {self.ge:g}" if self.ge is not None else ""]
        admits += [f"< {self.lt:g}" if self.lt is not None else ""]
        admits = ", ".join(a for a in admits if a)
        if self.choices:
            admits = " | ".join(self.choices)
        return f"{self.help} ({admits})" if admits else self.help


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. ``build(**options, **needs)`` constructs it; ``needs`` names what it
    takes from the run (:data:`NEEDS`); ``ledger`` says that the built loss keeps a ledger."""

    name: str
    summary: str
    build: Callable[..., Loss]
    options: dict[str, Option] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    ledger: bool = False

    def __post_init__(self) -> None:
        unknown = [need for need in self.needs if need not in NEEDS]
        if unknown:
            raise ValueError(f"loss {self.name!r}: unknown needs {unknown}; valid: {NEEDS}")


def check_specs(specs: Sequence[LossSpec]) -> dict[str, Option]:
    """Every option of every loss by name, after checking that names are unique and that an
    option two losses share means the same in both."""
    names, options, owners = set(), {}, {}
    for spec in specs:
        if spec.name in names:
            raise ValueError(f"loss {spec.name!r} is declared twice")
        names.add(spec.name)
        for key, option in spec.options.items():
            if key == "name" or key in NEEDS:
                raise ValueError(f"loss {spec.name!r}: option {key!r} is a reserved name")
            if key in options and options[key] != option:
                raise ValueError(
                    f"loss option {key!r} of {spec.name!r} differs from {owners[key]!r}'s: an "
                    "option two losses share must be the same option (or take another name)"
                )
            options.setdefault(key, option)
            owners.setdefault(key, spec.name)
    return options


__all__ = ["NEEDS", "Loss", "LossSpec", "Option", "check_specs"]
