"""Baseline losses: plain cross-entropy and prior-corrected cross-entropy.

``LogitAdjustedLoss`` is the logit-adjusted loss of Menon et al. (ICLR 2021): cross-entropy over
``logits + tau * log(prior)``, the prior being the training class frequencies. Balanced softmax
(Ren et al., NeurIPS 2020) adds ``log(count)`` instead; since log(count) and log(prior) differ by
a constant per row, it is the same loss with tau = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gala_scale.losses.registry import Loss, LossSpec, Option


class CrossEntropyLoss(Loss):
    """Cross-entropy over raw logits; hard (class index) or soft (probability) targets."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)


class LogitAdjustedLoss(Loss):
    """Cross-entropy over ``logits + tau * log(prior)``; ``prior`` from ``class_counts``."""

    def __init__(self, class_counts: Sequence[float] | torch.Tensor, tau: float = 1.0) -> None:
        super().__init__()
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        if counts.dim() != 1 or counts.numel() < 2:
            raise ValueError(f"class_counts must be a 1-D sequence of >= 2 counts, got {counts}")
        if not bool((counts > 0).all()):
            empty = torch.nonzero(counts <= 0).flatten().tolist()
            raise ValueError(f"class_counts must be positive; classes {empty[:10]} are not")
        self.tau = float(tau)
        log_prior = torch.log(counts / counts.sum())
        self.register_buffer("log_prior", log_prior.float())

    def extra_repr(self) -> str:
        return f"num_classes={self.log_prior.numel()}, tau={self.tau}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.log_prior.numel():
            raise ValueError(
                f"logits must have shape (batch, {self.log_prior.numel()}), "
                f"got {tuple(logits.shape)}"
            )
        return F.cross_entropy(logits.float() + self.tau * self.log_prior, targets)


def balanced_softmax(class_counts: Sequence[float] | torch.Tensor) -> LogitAdjustedLoss:
    """Balanced softmax: cross-entropy over ``logits + log(count)``."""
    return LogitAdjustedLoss(class_counts, tau=1.0)


SPECS = [
    LossSpec("ce", "plain cross-entropy", CrossEntropyLoss),
    LossSpec(
        "logit_adjusted",
        "cross-entropy over logits + tau x log(prior) (Menon et al., 2021)",
        LogitAdjustedLoss,
        options={"tau": Option(1.0, "weight of log prior", ge=0.0)},
        needs=("class_counts",),
    ),
    LossSpec(
        "balanced_softmax",
        "cross-entropy over logits + log(count) (Ren et al., 2020)",
        balanced_softmax,
        needs=("class_counts",),
    ),
]
