"""The optimum of a stage-2 objective, by full-batch L-BFGS: what a converged stage 2 reaches.

    python -m gala_scale.convex --features <cache version folder> [--losses ce balanced_softmax]
        [--weight-decay 5e-4] [--run <stage-2 run> ...]

On the cached features of the eval-transform training view (``train_view0``), standardised as
stage 2 standardises them (or raw, ``--raw``, for a run without ``stage2.standardize``), a linear
classifier minimises the mean loss over the training samples
plus ``weight_decay / 2 * |W|^2`` (SGD's weight decay on the weight, none on the bias, as the
trainer's parameter groups), with ``torch.optim.LBFGS`` in float64 until the gradient vanishes.
For the losses whose objective is fixed (not GALA, whose ledger changes it during training)
this is the point a stage-2 run with ``sampler: instance`` converges to. It prints the test top-1
of each solve and, for each ``--run`` (a stage-2 run on the same features), that run's plain
top-1 beside the solve of its loss; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from gala_scale import metrics
from gala_scale.losses import create_loss, data_needs
from gala_scale.stage2 import Standardized, feature_statistics


def _split(folder: Path, name: str) -> tuple[torch.Tensor, np.ndarray]:
    features = np.load(folder / f"{name}.features.npy", mmap_mode="r")
    labels = np.load(folder / f"{name}.labels.npy")
    return torch.from_numpy(np.asarray(features, dtype=np.float64)), labels


def loss_of(name: str, counts: list[int]) -> nn.Module:
    """The loss ``name`` with its defaults and what it needs of the training counts."""
    return create_loss(name, **data_needs(name, len(counts), counts))


def solve(
    features: torch.Tensor,
    labels: np.ndarray,
    loss: str,
    weight_decay: float,
    max_iter: int = 1000,
    standardize: bool = True,
    num_classes: int = 0,
) -> Standardized:
    """The classifier minimising ``loss`` + weight decay on ``features``, standardised (as
    ``stage2.standardize`` does) or raw (mean 0, std 1 in the returned module)."""
    counts = np.bincount(labels, minlength=num_classes or 0).tolist()
    if standardize:
        mean, std = feature_statistics(features.numpy())
    else:
        mean, std = torch.zeros(features.shape[1]), torch.ones(features.shape[1])
    x = (features - mean.double()) / std.double()
    y = torch.from_numpy(labels.astype(np.int64))
    criterion = loss_of(loss, counts)
    fc = nn.Linear(x.shape[1], len(counts)).double()
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    optimizer = torch.optim.LBFGS(
        fc.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        value = criterion(fc(x), y).double() + weight_decay / 2 * fc.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(objective)
    return Standardized(fc.float(), mean, std)


def _plain_top1(run: Path) -> tuple[str, float]:
    """A finished run's loss name and plain test top-1."""
    results = json.loads((run / "results.json").read_text())
    loss = yaml.safe_load((run / "config.yaml").read_text())["loss"]["name"]
    return loss, results["test"]["plain"]["top1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gala_scale.convex",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--features", type=Path, required=True, help="a feature cache version")
    p.add_argument("--losses", nargs="+", default=["ce", "balanced_softmax"])
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument(
        "--raw", action="store_true", help="raw features (stage2.standardize: false, the default)"
    )
    p.add_argument("--run", type=Path, nargs="*", default=[], help="stage-2 runs to compare")
    args = p.parse_args(argv)
    for name in ("train_view0", "test"):
        if not (args.features / f"{name}.features.npy").is_file():
            p.error(f"{args.features}: no {name}.features.npy (a stage-2 cache version folder)")
    train_x, train_y = _split(args.features, "train_view0")
    test_x, test_y = _split(args.features, "test")
    classes = int(max(train_y.max(), test_y.max())) + 1
    counts = np.bincount(train_y, minlength=classes).tolist()
    solved = {}
    for loss in args.losses:
        model = solve(
            train_x, train_y, loss, args.weight_decay, args.max_iter, not args.raw, classes
        )
        with torch.no_grad():
            probs = torch.softmax(model(test_x.float()), 1)
        summary = metrics.summarize(probs, test_y, counts)
        solved[loss] = {k: summary[k] for k in ("top1", "many", "medium", "few", "ece")}
        print(f"L-BFGS {loss}: test top-1 {100 * summary['top1']:.2f} %", flush=True)
    runs = {}
    for run in args.run:
        loss, top1 = _plain_top1(run)
        gap = None if loss not in solved else top1 - solved[loss]["top1"]
        runs[str(run)] = {"loss": loss, "top1": top1, "minus_lbfgs": gap}
        note = "" if gap is None else f" ({100 * gap:+.2f} points against L-BFGS)"
        print(f"{run}: {loss} test top-1 {100 * top1:.2f} %{note}", flush=True)
    summary = {"weight_decay": args.weight_decay, "standardized": not args.raw}
    print(json.dumps({**summary, "lbfgs": solved, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
