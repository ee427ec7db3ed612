"""Prediction re-balancing (PN): remove the head-class bias left in a model's probabilities.

Spec: docs/losses.md, "Prediction re-balancing". With p = softmax(z):

* transductive (paper eq. 13, over the scored set of B samples):
  ``p~_bk = p_bk / (sum_b p_bk)^tau``;
* stored (what a deployment can do): ``m_k = mean_b p_bk`` fitted on a calibration split, then
  ``p~ = p / m^tau`` for any later sample.

Both are renormalised to rows summing to 1; the argmax is the same when the calibration split is
the scored set. ``log p~ = log p - tau log m``: post-hoc logit adjustment with a prior estimated
from the model's own predictions. Fit on a validation split, never on the reported test split.

Every function takes numpy arrays or torch tensors and returns the same kind.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gala_scale import metrics

Array = Any  # np.ndarray | torch.Tensor
ROW_SUM_ATOL = 1e-3
TAUS = tuple(float(t) for t in np.round(np.linspace(0.0, 2.0, 21), 2))
ARGMAX_BLOCK = 2**18  # elements of a block of rows in a tau search (1 MiB of float32)


def _is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def _all(mask: Array) -> bool:
    return bool(mask.all())


def _isfinite(x: Array) -> Array:
    return torch.isfinite(x) if _is_torch(x) else np.isfinite(x)


def check_probs(probs: Array, num_classes: int | None = None, name: str = "probs") -> None:
    """Raise ValueError unless ``probs`` is a (B, K) matrix of finite probabilities."""
    if not (_is_torch(probs) or isinstance(probs, np.ndarray)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(probs).__name__}")
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
        raise ValueError(f"{name} must have shape (batch >= 1, classes >= 2), got {probs.shape}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"{name} has {probs.shape[1]} classes, the scales have {num_classes}")
    if not _all(_isfinite(probs)):
        raise ValueError(f"{name} contains NaN or inf")
    if not _all(probs >= 0):
        raise ValueError(f"{name} contains negative values")
    worst = float(abs(probs.sum(1) - 1).max())
    if worst > ROW_SUM_ATOL:
        raise ValueError(
            f"{name} rows must sum to 1 (softmax outputs); worst row is off by {worst:.3g}"
        )


def check_scales(scales: Array, tau: float) -> None:
    if scales.ndim != 1 or scales.shape[0] < 2:
        raise ValueError(f"scales must be a 1-D vector of >= 2 classes, got shape {scales.shape}")
    if not _all(_isfinite(scales)) or not _all(scales > 0):
        raise ValueError("scales must be finite and > 0 (one mean probability per class)")
    if not np.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be finite and >= 0, got {tau}")


def _fill_zero_mass(mass: Array) -> Array:
    """Classes without any probability mass get the smallest mass of the others.

    PN divides by the mass, so it is undefined for a class that the model never gives any
    probability (softmax underflows to exactly 0, e.g. for a tail class early in training).
    Treating such a class as the rarest class that was seen keeps every prediction finite.
    """
    empty = mass <= 0  # never all of them: the rows were checked to sum to 1
    if not _all(~empty):
        classes = (empty.nonzero()[0] if not _is_torch(mass) else empty.nonzero()[:, 0]).tolist()
        warnings.warn(
            f"PN: classes {classes[:20]}{'...' if len(classes) > 20 else ''} have zero "
            "probability mass; they get the smallest mass of the other classes",
            RuntimeWarning,
            stacklevel=3,
        )
        mass = mass.clone() if _is_torch(mass) else mass.copy()
        mass[empty] = mass[~empty].min()
    return mass


def fit(probs: Array) -> Array:
    """Per-class scales m_k: the mean probability of class k over a calibration set."""
    check_probs(probs)
    return _fill_zero_mass(probs.mean(0))


def _normalise_by(probs: Array, scales: Array, tau: float) -> Array:
    weights = scales**tau
    if not _is_torch(probs):  # the probabilities' dtype: a float64 copy at 8,142 classes is slow
        weights = weights.astype(probs.dtype)
    adjusted = probs / weights
    adjusted /= adjusted.sum(1, keepdims=True)  # in place: one (B, K) array, not two
    return adjusted


def apply(probs: Array, scales: Array, tau: float = 1.0) -> Array:
    """Re-balanced probabilities ``p / m^tau``, rows renormalised to sum to 1."""
    check_scales(scales, tau)
    check_probs(probs, num_classes=scales.shape[0])
    if _is_torch(probs) != _is_torch(scales):
        raise TypeError("probs and scales must both be numpy arrays or both torch tensors")
    return _normalise_by(probs, scales.to(probs.dtype) if _is_torch(probs) else scales, tau)


def transductive(probs: Array, tau: float = 1.0) -> Array:
    """The paper's transductive PN over the scored set itself: ``p / (sum_b p)^tau``."""
    check_probs(probs)
    return _normalise_by(probs, _fill_zero_mass(probs.sum(0)), tau)


def best_tau(
    labels: np.ndarray,
    predict: Callable[[float], np.ndarray],
    taus: Sequence[float] = TAUS,
) -> float:
    """The tau in ``taus`` whose predictions ``predict(tau)`` give the best class-balanced
    accuracy on ``labels``. Use a validation split, never the reported test split. Ties go to
    the smallest tau."""
    labels = np.asarray(labels)
    best, best_acc = 0.0, -1.0
    for tau in taus:
        preds = np.asarray(predict(float(tau)))
        acc = float(np.nanmean(metrics.per_class_accuracy(preds, labels, int(labels.max()) + 1)))
        if acc > best_acc + 1e-12:
            best, best_acc = float(tau), acc
    return best


def fit_tau(
    probs: np.ndarray,
    labels: np.ndarray,
    scales: np.ndarray | None = None,
    taus: Sequence[float] = TAUS,
) -> float:
    """The PN tau (:func:`best_tau`) for ``scales`` (fitted on ``probs`` when None)."""
    check_probs(probs)
    scales = fit(probs) if scales is None else scales
    return best_tau(labels, adjusted_argmax(probs, scales, taus), taus)


def _argmax_table(
    rows: int,
    columns: int,
    block: Callable[[slice], torch.Tensor],
    adjust: Callable[[torch.Tensor, int], torch.Tensor],
    taus: Sequence[float],
) -> dict[float, np.ndarray]:
    """``{tau: argmax per row of adjust(block, i)}`` for the i-th tau, from one pass over blocks
    of rows: each block is made once and read from cache for every tau. The arrays are
    read-only (every caller of a tau gets the same one)."""
    table = torch.empty(len(taus), rows, dtype=torch.long)
    step = max(1, ARGMAX_BLOCK // max(1, columns))
    for start in range(0, rows if taus else 0, step):
        where = slice(start, start + step)
        values = block(where)
        for i in range(len(taus)):
            table[i, where] = adjust(values, i).argmax(1)
    found = table.numpy()
    found.flags.writeable = False
    return {float(t): preds for t, preds in zip(taus, found, strict=True)}


def adjusted_argmax(
    probs: Array, scales: Array, taus: Sequence[float] = TAUS
) -> Callable[[float], np.ndarray]:
    """``tau -> argmax(p / scales^tau)`` per row, for a tau search: the argmax of
    ``log p - tau log scales``, which renormalising does not change. Every tau of ``taus`` is
    done in one pass over blocks of rows (21 taus at 8,142 classes and 8,142 rows: 4.3 times
    faster than a tau at a time, docs/benchmarks.md); any other tau when asked, from the log of
    ``probs`` taken once. In float32, whatever the inputs' dtype."""
    probs = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    log_s = torch.log(torch.as_tensor(np.asarray(scales), dtype=torch.float32))
    offsets = torch.tensor([float(t) for t in taus])[:, None] * log_s
    found = _argmax_table(
        *probs.shape,
        lambda rows: torch.log(probs[rows].clamp_min(1e-38)),
        lambda log_p, i: log_p - offsets[i],
        taus,
    )

    @functools.cache
    def log_p() -> torch.Tensor:
        return torch.log(probs.clamp_min(1e-38))

    def predict(tau: float) -> np.ndarray:
        if tau in found:
            return found[tau]
        return (log_p() - tau * log_s).argmax(1).numpy()

    return predict


def normalised_argmax(
    features: Array, weight: Array, taus: Sequence[float] = TAUS
) -> Callable[[float], np.ndarray]:
    """``tau -> argmax`` per row of :func:`tau_normalised`'s logits, for a tau search. A logit
    ``f . w_k / |w_k|^tau`` is the plain one divided by ``|w_k|^tau``: the product is taken
    once a block of rows for every tau of ``taus``, not once a tau (3.8 times faster at 512-d
    features and 8,142 classes, docs/benchmarks.md; the product's share grows with the feature
    size); any other tau when asked. In float32, whatever the inputs' dtype."""
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    weight = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
    exponents = torch.tensor([float(t) for t in taus], dtype=torch.float32)[:, None]
    scales = weight.norm(dim=1) ** -exponents  # (taus, K)
    found = _argmax_table(
        features.shape[0],
        weight.shape[0],
        lambda rows: features[rows] @ weight.T,
        lambda logits, i: logits * scales[i],
        taus,
    )

    def predict(tau: float) -> np.ndarray:
        if tau in found:
            return found[tau]
        return tau_normalised(features, weight, tau).argmax(1).numpy()

    return predict


def prior(class_counts: Sequence[int]) -> np.ndarray:
    """The training label distribution: the scales of post-hoc logit adjustment.

    ``apply(probs, prior(counts), tau)`` is ``softmax(z - tau log pi)`` (Menon et al.): PN's
    formula with the training prior in place of the model's own mean prediction."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or not (counts > 0).all():
        raise ValueError("post-hoc logit adjustment needs a count > 0 for every class")
    return counts / counts.sum()


def tau_normalised(features: Array, weight: Array, tau: float) -> Array:
    """Logits of the tau-normalised classifier (Kang et al.): each class vector divided by its
    norm to the power tau, the bias left out; tau 0 is the plain dot product, 1 the cosine's
    direction. ``features`` (B, D), ``weight`` (K, D)."""
    if _is_torch(weight):
        return features @ (weight / weight.norm(dim=1, keepdim=True) ** tau).T
    return features @ (weight / np.linalg.norm(weight, axis=1, keepdims=True) ** tau).T
