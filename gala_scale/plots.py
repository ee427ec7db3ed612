"""PNG plots of a run: per-class accuracy vs training count, the ledger, positive predictions.

Classes are drawn head to tail. Up to ``MAX_POINTS`` classes each is a point; beyond that (ImageNet
-LT's 1,000, iNat's 8,142) the classes are cut into ``MAX_POINTS`` equal groups along that order
and each point is a group's mean, and the ledger becomes quantile bands over the classes of the
head, middle and tail thirds instead of one line a class.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

MAX_LEDGER_LINES = 30
MAX_POINTS = 100
MAX_TICK_LABELS = 30


def _head_to_tail(train_counts, *series) -> tuple[np.ndarray, list[np.ndarray], str]:
    """x positions, each series ordered head to tail (group means beyond MAX_POINTS), x label."""
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    ordered = [np.asarray(s, dtype=float)[order] for s in series]
    if len(counts) <= MAX_POINTS:
        return np.arange(len(counts)), ordered, "classes, most to fewest training images"
    groups = np.array_split(np.arange(len(counts)), MAX_POINTS)
    x = np.array([g.mean() for g in groups])
    means = [
        np.array([np.nanmean(s[g]) if np.isfinite(s[g]).any() else np.nan for g in groups])
        for s in ordered
    ]
    size = len(counts) / MAX_POINTS
    return x, means, f"classes, most to fewest training images (a point: mean of ~{size:.0f})"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def per_class_accuracy(train_counts, acc_plain, acc_pn, path: Path) -> None:
    """Test accuracy of each class against its training count, with and without PN."""
    x, (plain, pn, counts), label = _head_to_tail(train_counts, acc_plain, acc_pn, train_counts)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, plain, "o-", ms=3, label="plain")
    ax.plot(x, pn, "s-", ms=3, label="with PN (val scales)")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    twin = ax.twinx()
    twin.bar(x, counts, width=x[1] - x[0] if len(x) > 1 else 0.8, alpha=0.15, color="grey")
    twin.set_yscale("log")
    twin.set_ylabel("training images (bars)")
    ax.legend(loc="lower left")
    ax.set_title("Per-class accuracy against training count")
    _save(fig, path)


def ledger(history: dict, train_counts, path: Path) -> None:
    """What the logits used over the epochs (log scale): theta and phi, or S_theta and S_phi when
    ``history`` has them (``loss.ledger: sum_of_sums``). One line a class, coloured by training
    count, or beyond MAX_LEDGER_LINES classes the median and 10-90 % band of the head, middle and
    tail thirds."""
    sums = "s_theta" in history
    theta = np.asarray(history["s_theta" if sums else "theta"])
    phi = np.asarray(history["s_phi" if sums else "phi"])
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    epochs = np.arange(1, len(theta) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    banded = len(order) > MAX_LEDGER_LINES
    thirds = np.array_split(order, 3)
    colours = plt.cm.viridis(np.linspace(0, 1, 3 if banded else len(order)))
    for ax, values, name in (
        (axes[0], theta, "S_theta (sum of sums of positive)" if sums else "theta (positive)"),
        (axes[1], phi, "S_phi (sum of sums of negative)" if sums else "phi (negative)"),
    ):
        values = values + 1e-3
        if banded:
            for colour, group, part in zip(
                colours, thirds, ("head", "middle", "tail"), strict=True
            ):
                low, mid, high = np.percentile(values[:, group], [10, 50, 90], axis=1)
                ax.fill_between(epochs, low, high, color=colour, alpha=0.25)
                ax.plot(epochs, mid, color=colour, lw=1.5, label=f"{part} third ({len(group)})")
            ax.legend(fontsize=8)
        else:
            for colour, k in zip(colours, order, strict=True):
                ax.plot(epochs, values[:, k], color=colour, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"GALA ledger: {name}")
    axes[0].set_ylabel("accumulated gradient (+eps)")
    note = (
        "median and 10-90 % of the classes in each third, head to tail by training count"
        if banded
        else "colour: head (dark) to tail (light) classes"
    )
    fig.text(0.5, 0.005, note, ha="center", fontsize=8)
    _save(fig, path)


def positive_predictions(train_counts, plain, pn, path: Path) -> None:
    """How many test samples each class was predicted for, with and without PN."""
    x, (plain, pn), label = _head_to_tail(train_counts, plain, pn)
    width = 0.4 * (x[1] - x[0] if len(x) > 1 else 1)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.bar(x - width / 2, plain, width=width, label="plain")
    ax.bar(x + width / 2, pn, width=width, label="with PN (val scales)")
    ax.set_xlabel(label)
    ax.set_ylabel("test samples predicted as the class")
    ax.legend()
    ax.set_title("Positive predictions per class")
    _save(fig, path)


def comparison(train_counts, per_class: dict[str, list], path: Path) -> None:
    """Per-class test accuracy of several models against the training count."""
    x, curves, label = _head_to_tail(train_counts, *per_class.values())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = itertools.cycle("os^dvp<>")
    for name, acc, marker in zip(per_class, curves, markers, strict=False):
        ax.plot(x, acc, f"{marker}-", ms=4, label=name)
    counts = np.sort(np.asarray(train_counts))[::-1]
    if len(counts) <= MAX_TICK_LABELS:
        ax.set_xticks(x, [str(c) for c in counts], rotation=90, fontsize=7)
        label = "training images of the class (head to tail)"
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("Per-class test accuracy against training count")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)


def reliability(variants: dict[str, dict], path: Path) -> None:
    """Reliability diagram: each variant's accuracy against its mean confidence per confidence
    bin (metrics.reliability), the diagonal of a calibrated model, and its ECE in the legend."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    for (name, summary), marker in zip(variants.items(), itertools.cycle("os^vD"), strict=False):
        bins = summary["reliability"]
        kept = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"], strict=True) if c]
        ax.plot(
            *zip(*kept, strict=True), marker + "-", ms=4, label=f"{name} (ECE {summary['ece']:.3f})"
        )
    ax.set_xlabel("confidence (mean of a bin)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def training_curves(records: list[dict], path: Path) -> None:
    """The training loss (global mean an epoch) and, where scored, val top-1 and class-balanced
    accuracy against the epoch: where a run has flattened and where it still moves."""
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["epoch"] + 1 for r in train], [r["loss"] for r in train], "o-", ms=3, label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    if val:
        twin = ax.twinx()
        epochs = [r["epoch"] + 1 for r in val]
        twin.plot(epochs, [r["top1"] for r in val], "s--", ms=3, color="C1", label="val top-1")
        twin.plot(
            epochs,
            [r["mean_class_acc"] for r in val],
            "^--",
            ms=3,
            color="C2",
            label="val mean class",
        )
        twin.set_ylabel("val accuracy")
        twin.set_ylim(0, 1.02)
        twin.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)
