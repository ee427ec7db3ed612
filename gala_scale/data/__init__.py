"""Input pipelines over shard sets: DALI (GPU or CPU) or the webdataset + torch fallback.

    loader = create_loader("shards/synthetic", "train", preset="cifar", batch_size=64, train=True,
                           rank=rank, world=world, seed=0, device=device)
    for images, labels in loader.epoch(epoch):   # exactly loader.steps_per_epoch batches
        ...

Eval loaders pad their last batches with label -1 (``PAD_LABEL``); drop those before scoring.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gala_scale.data import presets
from gala_scale.data.common import (
    PAD_LABEL,
    cutout_,
    epoch_shards,
    open_split,
    rank_segments,
    rebatch,
    steps_per_epoch,
)
from gala_scale.shards import tario

LOADERS = ("auto", "dali", "torch")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % 2**31)


class ShardLoader:
    """Batches of one split for one rank, epoch by epoch, by a fixed policy (see data.common)."""

    def __init__(
        self,
        root: Path | str,
        split: str,
        *,
        preset: str,
        batch_size: int,
        train: bool,
        kind: str = "auto",
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        num_workers: int | None = None,
        augment: presets.Augment | None = None,
        cutout: int = 0,
        num_classes: int | None = None,
        channels_last: bool = False,
    ):
        if kind not in LOADERS:
            raise ValueError(f"unknown loader {kind!r}; valid: {', '.join(LOADERS)}")
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world, got {batch_size}, {rank}, {world}"
            )
        self.preset = presets.get_preset(preset)
        self.augment = augment or presets.Augment()
        if self.augment.autoaugment and self.preset.name != "cifar":
            raise ValueError("autoaugment is the CIFAR policy: use it with preset 'cifar'")
        self.info = open_split(root, split, num_classes)
        self._check_images_fit()
        self.kind = "dali" if kind == "auto" else kind
        self.batch_size, self.train, self.rank, self.world = batch_size, train, rank, world
        self.seed, self.device = seed, torch.device(device)
        self.num_workers = os.cpu_count() if num_workers is None else num_workers
        self.cutout = cutout
        self.channels_last = channels_last  # batches in the model's memory format
        self.steps_per_epoch = steps_per_epoch(self.info.num_samples, world, batch_size, train)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{root}: split {split!r} has {self.info.num_samples} samples, "
                f"fewer than one batch of {batch_size} a rank over {world} ranks"
            )

    def _check_images_fit(self) -> None:
        shard = self.info.shards[0]
        key, files = next(tario.iter_tar(shard.tar))

        with Image.open(io.BytesIO(files[self.info.image_ext])) as img:
            presets.check_image_fits(self.preset, *img.size, f"{shard.tar}: sample {key}")

    def _chunks(self, epoch: int):
        shards = epoch_shards(self.info.shards, self.seed, epoch, shuffle=self.train)
        if self.kind == "dali":
            from gala_scale.data import dali

            cuda = self.device.type == "cuda"
            pipe = dali.build_pipeline(
                shards,
                self.info.image_ext,
                self.preset,
                self.augment,
                train=self.train,
                batch_size=self.batch_size,
                rank=self.rank,
                world=self.world,
                seed=_seed(self.seed, epoch, self.rank),
                device_id=(self.device.index or 0) if cuda else None,
                num_threads=max(1, self.num_workers),
                channels_last=self.channels_last,
            )
            return dali.iterate(pipe, self.channels_last)
        from gala_scale.data import torch_loader

        return torch_loader.rank_chunks(
            rank_segments(shards, self.rank, self.world),
            self.info.image_ext,
            self.preset,
            train=self.train,
            options=self.augment,
            seed=(self.seed, epoch, self.rank),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from batch ``start_step`` on (for resuming)."""
        shape = (3, self.preset.crop, self.preset.crop)
        batches = rebatch(
            self._chunks(epoch),
            self.batch_size,
            self.steps_per_epoch,
            pad=not self.train,
            sample_shape=shape,
        )
        generator = torch.Generator(self.device) if self.train and self.cutout else None
        for step, (images, labels) in enumerate(batches):
            if step < start_step:
                continue
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.channels_last:  # a no-op for DALI's permuted NHWC batches
                images = images.contiguous(memory_format=torch.channels_last)
            if generator is not None:
                # Seeded per step, so a run resumed inside an epoch cuts the same squares.
                generator.manual_seed(_seed(self.seed, epoch, self.rank, step))
                cutout_(images, self.cutout, generator)
            yield images, labels


def create_loader(root: Path | str, split: str, **kwargs) -> ShardLoader:
    return ShardLoader(root, split, **kwargs)


__all__ = ["LOADERS", "PAD_LABEL", "ShardLoader", "create_loader"]
