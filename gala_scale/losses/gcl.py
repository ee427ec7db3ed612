"""Gaussian clouded logit loss (GCL; Li, Cheung and Lu, CVPR 2022, "Long-tailed Visual Recognition
via Gaussian Clouded Logit Adjustment").

Form, as in the authors' code (Keke921/GCLLoss, ``losses.py``, ``GCLLoss``, lines 55-83). The
logits z are cosine similarities (a normalised classifier). Each class j gets a cloud size from
the log of its training count n_j, zero for the largest class and largest for the rarest:

    delta_j = log(max_k n_k) - log(n_j),      a_j = noise_mul * delta_j / max_k delta_k

(lines 58-59 and 78; ``a = 0`` when all counts are equal, where the authors' code divides by
zero). In training every logit of every sample loses its class's cloud times a fresh draw of
half-normal noise:

    z~_ij = z_ij - a_j |eps_ij|,    eps_ij ~ N(0, (1/3)^2) clipped to [-1, 1]    (lines 65, 75, 78)

then a constant ``margin`` m leaves the target logit and the loss is the batch mean of the
cross-entropy of ``scale`` times the result (lines 79 and 83):

    loss_i = CE(s * (z~_i - m e_{y_i}), y_i).

The tail classes' logits are lowered by larger random amounts, which keeps their samples off the
saturated part of the softmax. In eval mode there is no noise (the margin stays).

Defaults: ``scale = 30`` and ``margin = 0`` as both of the authors' first-stage scripts pass them
(``cifar_train_backbone.py`` line 238, ``Places-LT/pla_train_backbone.py`` line 233; the class's
own default margin, 0.5, is used by neither); ``noise_mul = 1``, the class default and the
Places-LT script's value (the CIFAR script passes 0.5). The authors' second stage (classifier
re-training with class-balanced sampling, ``train_cls=True``: a focal term, m = 0.1, s = 20) is
not this loss's business. The paper's text was not at hand, so equation numbers are not given.

Randomness: the noise is the only random part. It is drawn on the logits' device from
``generator`` if one is given (it must live on that device), else from torch's default generator
for that device, so ``torch.manual_seed`` makes a run's noise reproducible. The authors sample on
the CPU and copy; drawing in place saves that copy.

Soft targets t (rows of probabilities: mixup, cutmix, label smoothing) take the expectation of the
hard loss over the target distribution, with one noise draw per row: ``mean_i sum_k t_ik l_ik``,
``l_ik`` the loss of row i if its label were k. With ``margin = 0`` that is the soft
cross-entropy of ``s * z~``. (The authors' mixup criterion calls the loss once for each of the
two labels, so each half sees its own noise.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gala_scale.losses.class_balanced import check_counts, check_logits
from gala_scale.losses.ldam import SCALE, check_scale, margin_losses
from gala_scale.losses.registry import Loss, LossSpec, Option

NOISE_STD = 1.0 / 3.0  # the authors' N(0, 1/3), clipped at 3 standard deviations


class GCLLoss(Loss):
    """Cross-entropy of ``scale * (cosine logits - class clouds x |noise| - margin on target)``."""

    def __init__(
        self,
        class_counts: Sequence[float] | torch.Tensor,
        scale: float = 30.0,
        margin: float = 0.0,
        noise_mul: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        counts = check_counts(class_counts)
        self.scale = check_scale(scale)
        for name, value in (("margin", margin), ("noise_mul", noise_mul)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.margin, self.noise_mul = float(margin), float(noise_mul)
        self.generator = generator
        delta = counts.log().max() - counts.log()
        top = delta.max()
        cloud = delta * (self.noise_mul / top) if top > 0 else torch.zeros_like(delta)
        self.register_buffer("cloud", cloud.float())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.cloud.numel()}, scale={self.scale}, margin={self.margin}, "
            f"noise_mul={self.noise_mul}"
        )

    def perturb(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits - cloud x |eps|`` with a fresh draw of eps (training), else ``logits``."""
        if not self.training or not self.noise_mul:
            return logits
        eps = torch.empty_like(logits).normal_(0.0, NOISE_STD, generator=self.generator)
        return logits - self.cloud * eps.clamp_(-1.0, 1.0).abs_()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_logits(logits, targets, self.cloud.numel())
        clouded = self.perturb(logits.float())
        if targets.dim() == 1:
            rows = targets.unsqueeze(1)
            adjusted = clouded.scatter_add(1, rows, torch.full_like(clouded[:, :1], -self.margin))
            return F.cross_entropy(self.scale * adjusted, targets)
        margins = torch.full_like(self.cloud, self.scale * self.margin)
        losses = margin_losses(self.scale * clouded, margins)
        return (targets.float() * losses).sum(dim=1).mean()


SPECS = [
    LossSpec(
        "gcl",
        "Gaussian clouded logits (Li et al., 2022): rarer classes' logits lowered by larger "
        "random amounts; use a cosine classifier",
        GCLLoss,
        options={
            "scale": SCALE,
            "margin": Option(0.0, "margin subtracted from the target cosine logit", ge=0.0),
            "noise_mul": Option(
                1.0,
                "cloud size of the rarest class: its logits lose noise_mul x |N(0, 1/3) clipped "
                "to [-1, 1]| (head class: 0; 0 = no noise)",
                ge=0.0,
            ),
        },
        needs=("class_counts",),
    )
]
