"""What both loaders share: the shard list, the per-epoch plan, batching policy, Cutout.

Distributed policy (both loaders):

* Every epoch the shard order is permuted from ``(seed, epoch)``; the concatenated samples are
  cut into ``world`` contiguous ranges, rank r taking ``[N*r//W, N*(r+1)//W)``: disjoint and,
  together, complete. Within its range a rank shuffles through a buffer seeded from
  ``(seed, epoch, rank)``.
* Ranks hold N//W or N//W + 1 samples, so batch counts could differ by one and a collective would
  hang. Training yields exactly ``(N // W) // B`` full batches on every rank (the few samples
  beyond that are dropped, different ones each epoch). Evaluation yields exactly
  ``ceil(ceil(N / W) / B)`` batches on every rank, padded with label -1 (images of zeros), which
  metrics skip: every sample is scored once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gala_scale.shards.manifest import ManifestError, load_manifest

PAD_LABEL = -1


class DataError(ValueError):
    """A sample of the shard set cannot be read (an image that does not decode, a member
    missing): reading it again fails the same way, so a run stopped by it is not requeued."""


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path
    num_samples: int


@dataclass(frozen=True)
class SplitInfo:
    root: Path
    split: str
    shards: tuple[Shard, ...]
    num_samples: int
    num_classes: int
    class_counts: tuple[int, ...]
    image_ext: str
    class_names: tuple[str, ...]


def open_split(root: Path | str, split: str, num_classes: int | None = None) -> SplitInfo:
    """The shards of ``split`` in the set at ``root``, checked against the manifest."""
    root = Path(root)
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise ManifestError(f"{root}: no split {split!r}; it has {sorted(manifest['splits'])}")
    if num_classes is not None and num_classes != manifest["num_classes"]:
        raise ManifestError(
            f"{root / 'manifest.json'}: num_classes is {manifest['num_classes']}, "
            f"the configuration says {num_classes}"
        )
    info = manifest["splits"][split]
    if info["num_samples"] == 0:
        raise ManifestError(f"{root}: split {split!r} is empty")
    shards = []
    for entry in info["shards"]:
        tar, index = root / entry["file"], root / entry["index"]
        for path in (tar, index):
            if not path.is_file():
                raise ManifestError(f"{path}: listed in {root / 'manifest.json'} but missing")
        shards.append(Shard(tar, index, entry["num_samples"]))
    return SplitInfo(
        root,
        split,
        tuple(shards),
        info["num_samples"],
        manifest["num_classes"],
        tuple(info["class_counts"]),
        manifest["image_ext"],
        tuple(manifest["class_names"]),
    )


def epoch_shards(shards: tuple[Shard, ...], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    if not shuffle:
        return list(shards)
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank r's contiguous share of ``total`` samples (the split DALI's readers use)."""
    return total * rank // world, total * (rank + 1) // world


def rank_segments(shards: list[Shard], rank: int, world: int) -> list[tuple[Shard, int, int]]:
    """(shard, first, end) sample positions inside each shard that fall in this rank's range."""
    start, end = rank_range(sum(s.num_samples for s in shards), rank, world)
    segments, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(end, offset + shard.num_samples)
        if lo < hi:
            segments.append((shard, lo - offset, hi - offset))
        offset += shard.num_samples
    return segments


def steps_per_epoch(total: int, world: int, batch_size: int, train: bool) -> int:
    if train:
        return (total // world) // batch_size
    return math.ceil(math.ceil(total / world) / batch_size)


def rebatch(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    steps: int,
    pad: bool,
    sample_shape: tuple[int, ...],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``steps`` batches of ``batch_size`` from chunks of any size (see module doc).

    Chunks that already are whole batches pass through without a copy.
    """
    if steps <= 0:  # nothing left of the epoch: do not touch the chunks
        return
    held_x: list[torch.Tensor] = []
    held_y: list[torch.Tensor] = []
    done = 0
    for x, y in chunks:
        if not held_y and len(y) == batch_size:
            yield x, y
            done += 1
        else:
            held_x.append(x)
            held_y.append(y)
            while sum(len(t) for t in held_y) >= batch_size and done < steps:
                x_all, y_all = torch.cat(held_x), torch.cat(held_y)
                yield x_all[:batch_size], y_all[:batch_size]
                held_x, held_y = [x_all[batch_size:]], [y_all[batch_size:]]
                if not len(held_y[0]):
                    held_x, held_y = [], []
                done += 1
        if done == steps:
            return
    if not pad:
        raise RuntimeError(f"the loader ran dry after {done} of {steps} batches")
    while done < steps:
        if held_y:
            x_all, y_all = torch.cat(held_x), torch.cat(held_y)
        else:
            x_all, y_all = torch.zeros(0, *sample_shape), torch.zeros(0, dtype=torch.long)
        missing = batch_size - len(y_all)
        yield (
            torch.cat([x_all, x_all.new_zeros(missing, *sample_shape)]),
            torch.cat([y_all, y_all.new_full((missing,), PAD_LABEL)]),
        )
        held_x, held_y = [], []
        done += 1


def cutout_(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): zero a size x size square at a random centre, in place.

    The square spans ``[c - size//2, c - size//2 + size)`` and may stick out of the image.
    Applied to normalised batches, so zero is the mean colour, as in the authors' recipe.
    ``generator`` must live on the images' device.
    """
    n, _, h, w = images.shape
    top = torch.randint(0, h, (n, 1, 1), generator=generator, device=images.device) - size // 2
    left = torch.randint(0, w, (n, 1, 1), generator=generator, device=images.device) - size // 2
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill_(inside.unsqueeze(1), 0.0)
