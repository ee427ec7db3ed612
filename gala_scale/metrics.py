"""Evaluation metrics for long-tailed classification.

Shot groups follow the long-tailed literature (Liu et al., OLTR): many-shot classes have more
than 100 training images, medium-shot 20 to 100, few-shot fewer than 20. A group's accuracy is
the mean of its classes' accuracies; a group with no class is reported as ``None`` (absent), not
as 0. Inputs are numpy arrays or torch tensors; results are numpy arrays and floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MANY_SHOT_MIN = 101  # > 100 training images
FEW_SHOT_MAX = 19  # < 20 training images
SHOT_GROUPS = ("many", "medium", "few")
ECE_BINS = 15


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(labels: Any, num_classes: int) -> np.ndarray:
    labels = _numpy(labels).astype(np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    return labels


def top1(preds: Any, labels: Any) -> float:
    """Fraction of predictions equal to the label."""
    preds, labels = _numpy(preds), _numpy(labels)
    if preds.shape != labels.shape or preds.ndim != 1 or preds.size == 0:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} must be equal, 1-D, >0")
    return float((preds == labels).mean())


def per_class_accuracy(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Accuracy of each class over its samples; NaN for a class with no sample."""
    preds, labels = _numpy(preds).astype(np.int64), _labels(labels, num_classes)
    seen = np.bincount(labels, minlength=num_classes).astype(np.float64)
    hits = np.bincount(labels[preds == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, hits / seen, np.nan)


def shot_group(train_counts: Any) -> np.ndarray:
    """Each class's group name ("many", "medium", "few") from its training count."""
    counts = _numpy(train_counts)
    return np.where(
        counts >= MANY_SHOT_MIN, "many", np.where(counts <= FEW_SHOT_MAX, "few", "medium")
    )


def group_accuracy(class_acc: Any, train_counts: Any) -> dict[str, float | None]:
    """Mean per-class accuracy in each shot group; None for a group with no evaluated class."""
    class_acc, groups = _numpy(class_acc), shot_group(train_counts)
    if class_acc.shape != groups.shape:
        raise ValueError(f"{class_acc.shape[0]} class accuracies for {groups.shape[0]} counts")
    result: dict[str, float | None] = {}
    for name in SHOT_GROUPS:
        values = class_acc[(groups == name) & ~np.isnan(class_acc)]
        result[name] = float(values.mean()) if values.size else None
    return result


def positive_predictions(preds: Any, num_classes: int) -> np.ndarray:
    """How many samples were predicted as each class."""
    return np.bincount(_numpy(preds).astype(np.int64), minlength=num_classes)


def reliability(probs: Any, labels: Any, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin (``n_bins`` equal-width bins on (0, 1]): its sample count, accuracy
    and mean confidence (None for an empty bin); what a reliability diagram draws."""
    probs = _numpy(probs)  # in its own dtype: a float64 copy at 8,142 classes is half a GiB
    labels = _labels(labels, probs.shape[1])
    confidence, preds = probs.max(1).astype(np.float64), probs.argmax(1)
    correct = (preds == labels).astype(np.float64)
    # Bin b holds confidences in (b/n, (b+1)/n]; ceil puts an exact edge in the lower bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    hits = np.bincount(bins, weights=correct, minlength=n_bins)
    conf = np.bincount(bins, weights=confidence, minlength=n_bins)
    return {
        "count": count.tolist(),
        "accuracy": [float(h / c) if c else None for h, c in zip(hits, count, strict=True)],
        "confidence": [float(f / c) if c else None for f, c in zip(conf, count, strict=True)],
    }


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = ECE_BINS) -> float:
    """ECE: the bins' |accuracy - confidence| weighted by their share of the samples."""
    return _ece(reliability(probs, labels, n_bins))


def _ece(bins: dict[str, list]) -> float:
    total = sum(bins["count"])
    gaps = [
        n * abs(a - c)
        for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
        if n
    ]
    return float(sum(gaps) / max(total, 1))


def summarize(probs: Any, labels: Any, train_counts: Any) -> dict[str, Any]:
    """Top-1, shot groups, per-class accuracy, positive predictions, ECE and the reliability
    bins of ``probs``."""
    probs = _numpy(probs)
    num_classes = probs.shape[1]
    preds = probs.argmax(1)
    class_acc = per_class_accuracy(preds, labels, num_classes)
    bins = reliability(probs, labels)
    return {
        "top1": top1(preds, _numpy(labels)),
        **group_accuracy(class_acc, train_counts),
        "per_class": [None if np.isnan(a) else float(a) for a in class_acc],
        "positive_predictions": positive_predictions(preds, num_classes).tolist(),
        "ece": _ece(bins),
        "reliability": bins,
    }
