"""Mixup and CutMix on training batches, with soft targets for the loss (and GALA's ledger).

Applied to what a loader hands out (DALI or the torch fallback alike), on the batch's device,
one rank's batch at a time. Each batch's draws (whether it is mixed, mixup or CutMix, the
mixing weight, the partner permutation, the box) come from a generator seeded with ``(seed,
epoch, step, rank)``, so a resumed run mixes its batches as the uninterrupted one did.

Mixup (Zhang et al., ICLR 2018): ``x = lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(a,
a)``. CutMix (Yun et al., ICCV 2019): a box of ``1 - lam`` of the image's area (clipped at the
borders) is pasted from the partner, and ``lam`` becomes the area actually kept. Either way the
target is ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``. A batch left unmixed (``prob``)
keeps its hard labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mixing:
    mixup: float = 0.0  # Beta(a, a) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(a, a) of CutMix; 0 = off
    prob: float = 1.0  # chance that a batch is mixed at all
    switch: float = 0.5  # with both on: chance that a mixed batch takes CutMix

    def __post_init__(self) -> None:
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix need alpha >= 0, got {self.mixup}, {self.cutmix}")
        if not (0 <= self.prob <= 1 and 0 <= self.switch <= 1):
            raise ValueError(f"mix probabilities must be in [0, 1], got {self.prob}, {self.switch}")

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


def mixed(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    mixing: Mixing,
    num_classes: int,
    *,
    seed: int,
    epoch: int,
    first_step: int,
    rank: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` with mixing applied (see the module docstring); unchanged when it is off."""
    for step, (images, labels) in enumerate(batches, start=first_step):
        if not mixing.enabled:
            yield images, labels
            continue
        rng = np.random.default_rng([seed, epoch, step, rank])
        yield mix_batch(images, labels, mixing, num_classes, rng)


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    mixing: Mixing,
    num_classes: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    if rng.random() >= mixing.prob:
        return images, labels
    use_cutmix = mixing.cutmix > 0 and (mixing.mixup == 0 or rng.random() < mixing.switch)
    alpha = mixing.cutmix if use_cutmix else mixing.mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
    partner = images[perm]
    if use_cutmix:
        images, lam = _paste_box(images, partner, lam, rng)
    else:
        images = images * lam + partner * (1.0 - lam)
    hard = F.one_hot(labels.long(), num_classes).to(torch.float32)
    return images, hard * lam + hard[perm] * (1.0 - lam)


def _paste_box(images, partner, lam: float, rng: np.random.Generator):
    """Paste a box of about ``1 - lam`` of the area from ``partner``; the kept area's share."""
    height, width = images.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - box_h // 2, cy + box_h // 2], 0, height)
    left, right = np.clip([cx - box_w // 2, cx + box_w // 2], 0, width)
    out = images.clone()
    out[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return out, float(kept)
