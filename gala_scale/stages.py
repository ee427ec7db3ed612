"""Training stages: what a run learns from, and how its trained weights become a whole model.

A stage gives the trainer its loaders and the module to train, and gives export the trained
model. :class:`ImageStage` trains a model on images (the usual run);
:class:`gala_scale.stage2.FeatureStage` trains a classifier on a backbone's cached features
(``stage2.enabled``). :func:`stage_of` picks a run's stage; the trainer and export never branch
on which. A new stage is one class with these three methods (docs/architecture.md).

The split of batches over processes (:func:`layout`) and the augmentation a config asks for
(:func:`augmentation`) are defined here once, for every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gala_scale import recipe
from gala_scale.config import ConfigError, RunConfig
from gala_scale.data import create_loader
from gala_scale.data.presets import Augment
from gala_scale.models import create_model, model_options, run_preset
from gala_scale.run import Loaders


@dataclass(frozen=True)
class Layout:
    """How one process's share of the batches is laid out.

    Training: this process plays the virtual ranks ``train_ranks`` of ``train_world`` (more
    than one with ``train.emulate_world``), ``train_batch`` samples each. Evaluation: rank
    ``eval_rank`` of ``eval_world``, ``eval_batch`` samples a batch."""

    train_ranks: tuple[int, ...]
    train_world: int
    train_batch: int
    eval_rank: int
    eval_world: int
    eval_batch: int


def layout(cfg: RunConfig, accelerator) -> Layout:
    """The run's layout; a global batch that does not split evenly is a config error."""
    d, emulate, processes = cfg.data, cfg.train.emulate_world, accelerator.num_processes
    world = processes * emulate
    for key, batch, ranks in (
        ("data.batch_size", d.batch_size, world),
        ("data.eval_batch_size", d.eval_batch_size, processes),
    ):
        if batch % ranks:
            raise ConfigError(f"{key}: {batch} does not split evenly over {ranks} ranks")
    first = accelerator.process_index * emulate
    return Layout(
        tuple(range(first, first + emulate)),
        world,
        d.batch_size // world,
        accelerator.process_index,
        processes,
        d.eval_batch_size // processes,
    )


def augmentation(cfg: RunConfig) -> dict:
    """The training pipeline's augmentation keywords of a loader, from ``data``."""
    d = cfg.data
    return {"augment": Augment(d.autoaugment, d.color_jitter, d.randaugment), "cutout": d.cutout}


def preset(cfg: RunConfig):
    """The run's input preset; a model or preset that cannot give one is a config error."""
    try:
        return run_preset(cfg.data, cfg.model.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class Stage(Protocol):
    def loaders(self, cfg: RunConfig, accelerator, num_classes: int) -> Loaders: ...

    def model(
        self, cfg: RunConfig, num_classes: int, loaders: Loaders, say: Callable[[str], None]
    ) -> nn.Module: ...

    def trained_model(
        self, cfg: RunConfig, num_classes: int, weights: dict[str, torch.Tensor]
    ) -> nn.Module: ...


class ImageStage:
    """A model trained on decoded, augmented images (DALI or the torch loader)."""

    def loaders(self, cfg: RunConfig, accelerator, num_classes: int) -> Loaders:
        d, lay = cfg.data, layout(cfg, accelerator)
        common = {
            "channels_last": recipe.channels_last(cfg, accelerator.device.type == "cuda"),
            "preset": preset(cfg),
            "kind": d.loader,
            "seed": cfg.seed,
            "num_classes": num_classes,
            "device": accelerator.device,
            "num_workers": d.num_workers,
        }
        train = [
            create_loader(
                d.shards,
                d.train_split,
                batch_size=lay.train_batch,
                train=True,
                rank=rank,
                world=lay.train_world,
                **augmentation(cfg),
                **common,
            )
            for rank in lay.train_ranks
        ]

        def evaluation(split: str):
            if not split:
                return None
            return create_loader(
                d.shards,
                split,
                batch_size=lay.eval_batch,
                train=False,
                rank=lay.eval_rank,
                world=lay.eval_world,
                **common,
            )

        return Loaders(train, evaluation(d.val_split), evaluation(d.test_split))

    def model(self, cfg, num_classes, loaders, say) -> nn.Module:
        return recipe.model(cfg, num_classes, say)

    def trained_model(self, cfg, num_classes, weights) -> nn.Module:
        model = create_model(cfg.model.name, num_classes=num_classes, **model_options(cfg))
        model = recipe.with_head(model, cfg)
        model.load_state_dict(weights)
        return model


def stage_of(cfg: RunConfig) -> Stage:
    """The stage a run's config describes."""
    if cfg.stage2.enabled:
        from gala_scale.stage2 import FeatureStage

        return FeatureStage()
    return ImageStage()


__all__ = ["ImageStage", "Layout", "Stage", "augmentation", "layout", "preset", "stage_of"]
