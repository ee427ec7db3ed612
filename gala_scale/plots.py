"""PNG plots of a run: per-class accuracy vs training count, the ledger, positive predictions."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

MAX_LEDGER_LINES = 30


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def per_class_accuracy(train_counts, acc_plain, acc_pn, path: Path) -> None:
    """Test accuracy of each class against its training count, with and without PN."""
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(counts))
    ax.plot(x, np.asarray(acc_plain, dtype=float)[order], "o-", ms=3, label="plain")
    ax.plot(x, np.asarray(acc_pn, dtype=float)[order], "s-", ms=3, label="with PN (val scales)")
    ax.set_xlabel("classes, most to fewest training images")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    twin = ax.twinx()
    twin.bar(x, counts[order], alpha=0.15, color="grey")
    twin.set_yscale("log")
    twin.set_ylabel("training images (bars)")
    ax.legend(loc="lower left")
    ax.set_title("Per-class accuracy against training count")
    _save(fig, path)


def ledger(theta_history, phi_history, train_counts, path: Path) -> None:
    """theta and phi of each class over the epochs (log scale), coloured by training count."""
    theta, phi = np.asarray(theta_history), np.asarray(phi_history)
    counts = np.asarray(train_counts)
    shown = np.argsort(-counts, kind="stable")
    if len(shown) > MAX_LEDGER_LINES:
        shown = shown[np.linspace(0, len(shown) - 1, MAX_LEDGER_LINES).astype(int)]
    colours = plt.cm.viridis(np.linspace(0, 1, len(shown)))
    epochs = np.arange(1, len(theta) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, values, name in (
        (axes[0], theta, "theta (positive)"),
        (axes[1], phi, "phi (negative)"),
    ):
        for colour, k in zip(colours, shown, strict=True):
            ax.plot(epochs, values[:, k] + 1e-3, color=colour, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"GALA ledger: {name}")
    axes[0].set_ylabel("accumulated gradient (+eps)")
    fig.text(0.5, 0.005, "colour: head (dark) to tail (light) classes", ha="center", fontsize=8)
    _save(fig, path)


def positive_predictions(train_counts, plain, pn, path: Path) -> None:
    """How many test samples each class was predicted for, with and without PN."""
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.bar(x - 0.2, np.asarray(plain)[order], width=0.4, label="plain")
    ax.bar(x + 0.2, np.asarray(pn)[order], width=0.4, label="with PN (val scales)")
    ax.set_xlabel("classes, most to fewest training images")
    ax.set_ylabel("test samples predicted as the class")
    ax.legend()
    ax.set_title("Positive predictions per class")
    _save(fig, path)


def comparison(train_counts, per_class: dict[str, list], path: Path) -> None:
    """Per-class test accuracy of several models against the training count."""
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, acc), marker in zip(per_class.items(), itertools.cycle("os^dvp<>"), strict=False):
        ax.plot(
            np.arange(len(counts)),
            np.asarray(acc, dtype=float)[order],
            f"{marker}-",
            ms=4,
            label=name,
        )
    ax.set_xticks(np.arange(len(counts)), [str(c) for c in counts[order]], rotation=90, fontsize=7)
    ax.set_xlabel("training images of the class (head to tail)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("Per-class test accuracy against training count")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
