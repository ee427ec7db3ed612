"""The shard loader: one split's batches for one rank, epoch by epoch (DALI or torch).

See :mod:`gala_scale.data` for the contract.
"""

from __future__ import annotations

import base64
import io
import itertools
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
STATE_KEYS = ("kind", "rank", "world", "batch_size", "seed")  # a state fits only the same loader


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % 2**31)


class ShardLoader:
    """Batches of one split for one rank, epoch by epoch, by a fixed policy (see data.common)."""

    def __init__(
        self,
        root: Path | str,
        split: str,
        *,
        preset: str | presets.Preset,
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
        self.preset = preset if isinstance(preset, presets.Preset) else presets.get_preset(preset)
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
        self._stream = None  # DALI: the split's pipeline (data.dali.Stream), built on first use
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

    def _dali_stream(self, epoch: int, built: int, position: int = 0, checkpoint=None):
        """A pipeline seeded from the epoch it is ``built`` at, or restored from ``checkpoint``."""
        from gala_scale.data import dali

        cuda = self.device.type == "cuda"
        pipe = dali.build_pipeline(
            epoch_shards(self.info.shards, self.seed, built, shuffle=self.train),
            self.info.image_ext,
            self.preset,
            self.augment,
            train=self.train,
            batch_size=self.batch_size,
            rank=self.rank,
            world=self.world,
            seed=_seed(self.seed, built, self.rank),
            shuffle_seed=_seed(self.seed, built),  # alike on every rank
            device_id=(self.device.index or 0) if cuda else None,
            num_threads=max(1, self.num_workers),
            channels_last=self.channels_last,
            checkpoint=checkpoint,
        )
        return dali.Stream(
            pipe,
            epoch,
            built=built,
            channels_last=self.channels_last,
            position=position,
            where=f"{self.info.root}: split {self.info.split!r}",
        )

    def _dali_at(self, epoch: int, start_step: int):
        """The run's pipeline, at batch ``start_step`` of ``epoch``."""
        stream = self._stream
        # Evaluation reads the same batches every time: any epoch is the stream's.
        wanted = epoch if self.train or stream is None else stream.epoch
        if stream is None or stream.epoch != wanted or stream.position > start_step:
            self._stream = stream = None  # the old pipeline goes before the new one is built
            self._stream = stream = self._dali_stream(epoch, built=epoch)
        # Only a fresh pipeline gets here behind start_step: it decodes what it skips.
        for _ in itertools.islice(stream.batches(), start_step - stream.position):
            pass
        return stream

    def _torch_chunks(self, epoch: int):
        from gala_scale.data import torch_loader

        shards = epoch_shards(self.info.shards, self.seed, epoch, shuffle=self.train)
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
        stream = self._dali_at(epoch, start_step) if self.kind == "dali" else None
        if stream is not None:
            chunks, first = stream.batches(), start_step
        else:
            chunks, first = self._torch_chunks(epoch), 0
        batches = rebatch(
            chunks,
            self.batch_size,
            self.steps_per_epoch - first,
            pad=not self.train,
            sample_shape=shape,
        )
        generator = torch.Generator(self.device) if self.train and self.cutout else None
        for step, (images, labels) in enumerate(batches, start=first):
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
        if stream is not None:
            stream.finish()

    def _identity(self) -> dict:
        return {key: getattr(self, key) for key in STATE_KEYS}

    def state(self) -> dict | None:
        """Where the DALI pipeline stands (JSON-ready), for a checkpoint; None for torch."""
        if self._stream is None:
            return None
        stream = self._stream
        return {
            **self._identity(),
            "built_epoch": stream.built,
            "epoch": stream.epoch,
            "step": stream.position,
            "checkpoint": base64.b64encode(stream.checkpoint()).decode("ascii"),
        }

    def restore(self, state: dict) -> None:
        """Continue from ``state()`` of a loader like this one; ValueError names what differs."""
        mine = self._identity()
        differ = [
            f"{k} {state.get(k)!r} (this loader: {mine[k]!r})"
            for k in mine
            if state.get(k) != mine[k]
        ]
        if differ:
            raise ValueError(f"the saved loader state does not fit: {', '.join(differ)}")
        self._stream = None
        self._stream = self._dali_stream(
            state["epoch"],
            built=state["built_epoch"],
            position=state["step"],
            checkpoint=base64.b64decode(state["checkpoint"]),
        )


def create_loader(root: Path | str, split: str, **kwargs) -> ShardLoader:
    return ShardLoader(root, split, **kwargs)


__all__ = ["LOADERS", "PAD_LABEL", "ShardLoader", "create_loader"]
