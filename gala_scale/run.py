"""What a training run is made of, as the trainer wires it and report and checkpoints read it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gala_scale.config import RunConfig
from gala_scale.losses import Loss
from gala_scale.recipe import WeightEMA


@dataclass
class Parts:
    """What a training step needs, prepared by Accelerate: model, loss, optimizer, schedule."""

    model: torch.nn.Module
    criterion: Loss
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: WeightEMA | None = None

    @property
    def eval_model(self) -> torch.nn.Module:
        """What evaluation, best/ and final/ use: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module


@dataclass
class Loaders:
    """A run's batches: the training loaders (one a virtual rank of this process), val, test."""

    train: list
    val: object | None = None
    test: object | None = None


@dataclass
class Run:
    """A run being trained: its config, launcher, parts, loaders and training set's classes."""

    cfg: RunConfig
    accelerator: object
    parts: Parts
    loaders: Loaders
    class_counts: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)


__all__ = ["Loaders", "Parts", "Run"]
