"""Class-balanced cross-entropy (Cui et al., CVPR 2019, "Class-Balanced Loss Based on Effective
Number of Samples"): each sample's cross-entropy is weighted by its class's inverse effective
number of samples.

The effective number of a class of n samples is ``(1 - beta^n) / (1 - beta)``; its inverse,
normalised so that the K weights sum to K, is the class weight

    w_j = K * v_j / sum_k v_k,    v_j = (1 - beta) / (1 - beta^n_j).

``beta = 0`` gives w = 1 (plain cross-entropy); beta -> 1 tends to inverse class frequency. The
weights are those of the authors' TensorFlow code (richardaecn/class-balanced-loss,
``src/cifar_main.py``, lines 428-430), applied from the first epoch.

Reduction: the authors' softmax loss (same file, lines 333-334) is
``tf.losses.softmax_cross_entropy(one_hot, logits, weights=w_y)``, whose default reduction divides
the weighted sum by the number of samples with a non-zero weight, i.e. by the batch size. So the
loss here is the plain batch mean of ``w_y * CE``, not torch's weighted mean
``sum(w_y * CE) / sum(w_y)`` (which LDAM-DRW uses, see ``ldam.py``).

Soft targets t (rows of probabilities: mixup, cutmix, label smoothing): a row's loss is
``-sum_k t_k w_k log p_k``, the expectation over the target distribution of the hard loss, and the
batch loss is its mean over rows; for one-hot t this is the hard loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gala_scale.losses.registry import Loss, LossSpec, Option

# Shared by every loss that weights classes by their effective number (class_balanced, ldam_drw).
BETA = Option(
    0.9999,
    "effective-number beta: class weight (1 - beta) / (1 - beta^count), normalised to sum to the "
    "number of classes (0 = equal weights)",
    ge=0.0,
    lt=1.0,
)


def check_counts(class_counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``class_counts`` as a float64 tensor, after checking it is 1-D, of >= 2 positive finite
    counts; raises ValueError naming ``class_counts`` otherwise."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"class_counts must be a 1-D sequence of >= 2 counts, got {counts}")
    bad = torch.nonzero(~(torch.isfinite(counts) & (counts > 0))).flatten().tolist()
    if bad:
        raise ValueError(f"class_counts must be positive and finite; classes {bad[:10]} are not")
    return counts


def check_beta(beta: float) -> float:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    return float(beta)


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class weights ``(1 - beta) / (1 - beta^n)`` normalised to sum to K (float64)."""
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts))  # beta = 0: 0^n = 0, all ones
    return weights * (counts.numel() / weights.sum())


def check_logits(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless logits are ``(B, K)`` and targets ``(B,)`` or ``(B, K)``."""
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"logits must have shape (batch, {num_classes}), got {tuple(logits.shape)}"
        )
    if targets.shape not in ((logits.shape[0],), logits.shape):
        raise ValueError(
            f"targets must be class indices (batch,) or probabilities {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )


class ClassBalancedLoss(Loss):
    """Batch mean of ``w_y * CE(logits, y)``, ``w`` from the effective number of each class."""

    def __init__(self, class_counts: Sequence[float] | torch.Tensor, beta: float = 0.9999) -> None:
        super().__init__()
        counts = check_counts(class_counts)
        self.beta = check_beta(beta)
        self.register_buffer("class_weights", effective_number_weights(counts, self.beta).float())

    def extra_repr(self) -> str:
        return f"num_classes={self.class_weights.numel()}, beta={self.beta}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_logits(logits, targets, self.class_weights.numel())
        if targets.dim() == 2:
            targets = targets.float()
        # reduction="none" gives w_y * CE per row (soft: -sum_k t_k w_k log p_k); the mean over
        # rows is the authors' reduction, where torch's "mean" would divide by sum(w_y).
        per_row = F.cross_entropy(logits.float(), targets, self.class_weights, reduction="none")
        return per_row.mean()


SPECS = [
    LossSpec(
        "class_balanced",
        "cross-entropy weighted by the inverse effective number of each class (Cui et al., 2019)",
        ClassBalancedLoss,
        options={"beta": BETA},
        needs=("class_counts",),
    )
]
