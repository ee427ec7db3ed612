"""Focal loss (Lin et al., ICCV 2017): cross-entropy with each sample's term scaled by
``(1 - p_t)^gamma``, so well-classified samples (mostly of the head classes) weigh less.

With soft targets t the loss of a row is ``-sum_k t_k (1 - p_k)^gamma log p_k``, which is the
focal loss for one-hot t. ``gamma = 0`` is cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gala_scale.losses.registry import Loss, LossSpec, Option


class FocalLoss(Loss):
    """Mean over the batch of ``-(1 - p_y)^gamma log p_y`` over raw logits."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        if targets.dim() == 1:
            log_p = log_p.gather(1, targets.unsqueeze(1))  # only the target's term counts
            targets = torch.ones_like(log_p)
        weight = (-log_p.exp()).add_(1.0).clamp_min_(0.0).pow_(self.gamma)  # 0^0 = 1: CE
        return -(targets.float() * weight * log_p).sum(dim=1).mean()


SPECS = [
    LossSpec(
        "focal",
        "focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_t)^gamma",
        FocalLoss,
        options={"gamma": Option(2.0, "focusing exponent, 0 = cross-entropy", ge=0.0)},
    )
]
