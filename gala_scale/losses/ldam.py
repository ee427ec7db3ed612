"""LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019, "Learning Imbalanced Datasets
with Label-Distribution-Aware Margin Loss").

Form, as in the authors' code (kaidic/LDAM-DRW, ``losses.py``, ``LDAMLoss``, lines 25-45): class j
of n_j training samples gets the margin

    m_j = max_margin * (min_k n_k / n_j)^(1/4)      (m_j proportional to n_j^(-1/4), largest =
                                                     max_margin, 0.5 by default)

subtracted from the target logit only, and the loss is the cross-entropy of ``scale`` times the
result (``s = 30``):

    loss_i = CE(s * (z_i - m_{y_i} e_{y_i}), y_i).

The logits are taken as given; the recipe pairs the loss with a cosine (normalised) classifier
(``cifar_train.py`` line 106, ``NormedLinear``), whose logits lie in [-1, 1] and need the scale.

Deferred re-weighting (DRW; ``cifar_train.py``, lines 199-206): for the first epochs every class
weighs 1; from epoch ``ceil(drw_start * epochs)`` (0-based; the authors switch at epoch 160 of
200, ``drw_start = 0.8``) each sample is weighted by its class's effective-number weight
``w_j = (1 - beta) / (1 - beta^n_j)`` normalised to sum to K (beta = 0.9999), as in
``class_balanced.py``. The authors pass these weights to ``F.cross_entropy(weight=...)`` with its
default reduction, so the weighted batch loss is torch's weighted mean
``sum_i w_{y_i} loss_i / sum_i w_{y_i}``, and that is what this module computes. The trainer turns
DRW on through :meth:`LDAMLoss.start_epoch`.

Soft targets t (rows of probabilities: mixup, cutmix, label smoothing) take the expectation of
the hard loss over the target distribution: with ``l_ik`` the hard loss of row i if its label
were k (the margin m_k on logit k),

    without DRW:  mean_i sum_k t_ik l_ik
    with DRW:     sum_i sum_k t_ik w_k l_ik / sum_i sum_k t_ik w_k,

which is the hard loss for one-hot t, and without DRW equals the usual two-label mixup criterion
``lam * loss(y_a) + (1 - lam) * loss(y_b)`` (the LDAM-DRW code has no mixup). Under DRW that
criterion would normalise each half by its own weight sum; one weighted mean over the pairs is
what a per-row target allows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gala_scale.losses.class_balanced import (
    BETA,
    check_beta,
    check_counts,
    check_logits,
    effective_number_weights,
)
from gala_scale.losses.registry import Loss, LossSpec, Option

_logger = logging.getLogger(__name__)

# Shared by the losses over cosine logits (ldam, ldam_drw, gcl).
SCALE = Option(30.0, "logit scale s before the softmax (cosine logits need ~30)", gt=0.0)


def margin_losses(scaled: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """``(B, K)``: entry (i, k) is ``-log softmax(scaled_i - margins_k e_k)_k``, the loss of row i
    if its label were k, for every k at once (soft targets weight these).

    With ``rest_ik = log sum_{j != k} exp(scaled_ij)`` the entry is
    ``softplus(rest_ik - (scaled_ik - margins_k))``. ``rest = lse + log(1 - p_k)`` loses nothing
    where p_k <= 1/2, which holds for every class but the row's top one; the top one's is a
    logsumexp with that logit masked (one more pass over the row), so confident rows (p_top
    near 1) do not cancel catastrophically in float32.
    """
    lse = torch.logsumexp(scaled, dim=1, keepdim=True)
    p = (scaled - lse).exp()
    rest = lse + torch.log1p(-p.clamp(max=0.5))  # clamp: the top entry is replaced below
    top = scaled.argmax(dim=1, keepdim=True)
    masked = scaled.scatter(1, top, float("-inf"))
    rest = rest.scatter(1, top, torch.logsumexp(masked, dim=1, keepdim=True))
    return F.softplus(rest - (scaled - margins))


def check_scale(scale: float) -> float:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return float(scale)


def first_drw_epoch(drw_start: float, epochs: int) -> int:
    """The first (0-based) epoch under re-weighting: ``ceil(drw_start * epochs)``, rounded first
    so that 0.7 * 10 is 7, not 7.000000000000001."""
    return math.ceil(round(drw_start * epochs, 9))


class LDAMLoss(Loss):
    """LDAM, optionally with deferred re-weighting: ``loss(logits, targets)`` -> the batch loss.

    ``drw_start=None``: no re-weighting (plain LDAM). Otherwise re-weighting is on in the epochs
    from ``ceil(drw_start * epochs)``, as :meth:`start_epoch` was last told; off until then.
    """

    def __init__(
        self,
        class_counts: Sequence[float] | torch.Tensor,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_start: float | None = 0.8,
        beta: float = 0.9999,
    ) -> None:
        super().__init__()
        counts = check_counts(class_counts)
        if not (math.isfinite(max_margin) and max_margin >= 0):
            raise ValueError(f"max_margin must be a finite number >= 0, got {max_margin}")
        if drw_start is not None and not 0.0 <= drw_start < 1.0:
            raise ValueError(
                f"drw_start must be in [0, 1) (a fraction of the run), got {drw_start}"
            )
        self.max_margin, self.scale = float(max_margin), check_scale(scale)
        self.drw_start, self.beta = drw_start, check_beta(beta)
        self.drw = False  # set by start_epoch (again after a resume), so not checkpointed
        margins = counts.pow(-0.25)
        self.register_buffer("margins", (margins * (self.max_margin / margins.max())).float())
        self.register_buffer("drw_weights", effective_number_weights(counts, self.beta).float())

    def extra_repr(self) -> str:
        drw = "off" if self.drw_start is None else f"from {self.drw_start}, beta={self.beta}"
        return (
            f"num_classes={self.margins.numel()}, max_margin={self.max_margin}, "
            f"scale={self.scale}, drw={drw}"
        )

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if not 0 <= epoch < epochs:
            raise ValueError(f"epoch must be in [0, epochs={epochs}), got {epoch}")
        drw = self.drw_start is not None and epoch >= first_drw_epoch(self.drw_start, epochs)
        if drw != self.drw:
            _logger.info(
                "LDAM: deferred re-weighting %s from epoch %d", "on" if drw else "off", epoch
            )
        self.drw = drw

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_logits(logits, targets, self.margins.numel())
        weights = self.drw_weights if self.drw else None
        if targets.dim() == 1:
            rows = targets.unsqueeze(1)
            adjusted = logits.float().scatter_add(1, rows, -self.margins[rows])
            return F.cross_entropy(self.scale * adjusted, targets, weight=weights)
        targets = targets.float()
        losses = margin_losses(self.scale * logits.float(), self.scale * self.margins)
        if weights is None:
            return (targets * losses).sum(dim=1).mean()
        targets = targets * weights
        return (targets * losses).sum() / targets.sum()


def ldam(
    class_counts: Sequence[float] | torch.Tensor, max_margin: float = 0.5, scale: float = 30.0
) -> LDAMLoss:
    """LDAM without deferred re-weighting."""
    return LDAMLoss(class_counts, max_margin=max_margin, scale=scale, drw_start=None)


_OPTIONS = {
    "max_margin": Option(
        0.5, "margin of the rarest class; margins go as count^(-1/4), on the target logit", ge=0.0
    ),
    "scale": SCALE,
}

SPECS = [
    LossSpec(
        "ldam_drw",
        "LDAM margins with deferred re-weighting (Cao et al., 2019); use a cosine classifier",
        LDAMLoss,
        options={
            **_OPTIONS,
            "drw_start": Option(
                0.8,
                "fraction of the epochs before deferred re-weighting (0.8: epoch 160 of 200)",
                ge=0.0,
                lt=1.0,
            ),
            "beta": BETA,
        },
        needs=("class_counts",),
    ),
    LossSpec(
        "ldam",
        "LDAM margins, no re-weighting (Cao et al., 2019); use a cosine classifier",
        ldam,
        options=_OPTIONS,
        needs=("class_counts",),
    ),
]
