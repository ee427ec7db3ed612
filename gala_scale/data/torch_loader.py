"""The fallback loader: the ``webdataset`` library, PIL and a torch DataLoader with workers.

For machines where DALI is unwanted. Each DataLoader worker reads whole segments of this rank's
shards (see :mod:`gala_scale.data.common`), decodes with PIL, augments in numpy and sends chunks
of samples to the main process, which cuts them into batches of exactly the policy's size.
"""

from __future__ import annotations

import io
import math
import signal
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gala_scale.data import autoaugment as policies
from gala_scale.data import presets
from gala_scale.data.common import DataError, Shard
from gala_scale.data.presets import Augment, Preset

CHUNK = 32  # samples per worker -> main process message
SHUFFLE_BUFFER = 1024  # as DALI's reader's initial_fill


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Crop a random area (8-100 %) and aspect (3/4-4/3) and resize it to size x size."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*presets.RRC_SCALE)
        ratio = math.exp(rng.uniform(*np.log(presets.RRC_RATIO)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            break
    else:  # fall back to the whole image's centre square
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    box = (int(left), int(top), int(left + cw), int(top + ch))
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def train_array(
    img: Image.Image, preset: Preset, rng: np.random.Generator, options: Augment
) -> np.ndarray:
    """Crop, the optional policies (the DALI pipeline's order), flip, normalise."""
    img = img.convert("RGB")
    if preset.random_resized_crop:
        img = random_resized_crop(img, preset.crop, rng)
    else:
        padded = np.pad(np.asarray(img), ((preset.pad,) * 2, (preset.pad,) * 2, (0, 0)))
        top, left = rng.integers(0, 2 * preset.pad + 1, size=2)
        img = Image.fromarray(padded[top : top + preset.crop, left : left + preset.crop])
    if options.autoaugment:
        img = policies.autoaugment_pil(img, rng)
    if options.color_jitter:
        img = policies.color_jitter_pil(img, options.color_jitter, rng)
    if options.randaugment:
        img = policies.randaugment_pil(img, rng)
    arr = np.asarray(img)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return presets.normalise(arr, preset)


class _RankStream(IterableDataset):
    """This rank's samples for one epoch, split over DataLoader workers by segment."""

    def __init__(
        self,
        segments: list[tuple[Shard, int, int]],
        image_ext: str,
        preset: Preset,
        train: bool,
        options: Augment,
        seed: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.segments, self.image_ext, self.preset = segments, image_ext, preset
        self.train, self.options, self.seed = train, options, seed

    def _samples(self, segments) -> Iterator[tuple[bytes, int, str]]:
        for shard, first, end in segments:
            stream = wds.WebDataset(
                str(shard.tar),
                shardshuffle=False,
                nodesplitter=None,
                workersplitter=None,
                empty_check=False,
            )
            for position, sample in enumerate(stream):
                if position >= end:
                    break
                if position >= first:
                    where = f"{shard.tar}: sample {sample['__key__']}"
                    if self.image_ext not in sample or "cls" not in sample:
                        raise DataError(f"{where}: no '{self.image_ext}' or 'cls' component")
                    yield sample[self.image_ext], int(sample["cls"]), where

    def _shuffled(self, samples, rng: np.random.Generator):
        if not self.train:
            yield from samples
            return
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([*self.seed, worker])
        xs, ys = [], []
        for data, label, where in self._shuffled(
            self._samples(self.segments[worker::workers]), rng
        ):
            try:
                img = Image.open(io.BytesIO(data))
                arr = (
                    train_array(img, self.preset, rng, self.options)
                    if self.train
                    else presets.eval_array(img, self.preset)
                )
            except OSError as err:
                raise DataError(f"{where}: image does not decode ({err})") from err
            xs.append(arr)
            ys.append(label)
            if len(ys) == CHUNK:
                yield torch.from_numpy(np.stack(xs)), torch.tensor(ys)
                xs, ys = [], []
        if ys:
            yield torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A preempted Slurm step signals every process, DataLoader workers too: a worker that died
    of SIGTERM would fail the trainer's next batch before it could checkpoint. Workers ignore the
    stop signals; the trainer ends them when it stops (and they exit if it dies)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def rank_chunks(
    segments,
    image_ext: str,
    preset: Preset,
    *,
    train: bool,
    options: Augment,
    seed: tuple[int, ...],
    num_workers: int,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Chunks of (images, labels) of this rank for one epoch."""
    stream = _RankStream(segments, image_ext, preset, train, options, seed)
    workers = min(num_workers, len(segments))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=pin_memory,  # page-locked chunks: the copy to the GPU can overlap
        worker_init_fn=_leave_stop_signals_to_the_trainer,
    )
    yield from loader
