"""The optimum of a stage-2 objective, by full-batch L-BFGS: what a converged stage 2 reaches.

    python -m gala_scale.convex --features <cache version folder> [--losses ce balanced_softmax]
        [--weight-decay 5e-4 [2e-3 ...]] [--run <stage-2 run> ...]

On the cached features of the eval-transform training view (``train_view0``), standardised as
stage 2 standardises them (or raw, ``--raw``, for a run without ``stage2.standardize``), a linear
classifier minimises the mean loss over the training samples
plus ``weight_decay / 2 * |W|^2`` (SGD's weight decay on the weight, none on the bias, as the
trainer's parameter groups), with ``torch.optim.LBFGS`` in float64 until the gradient vanishes.
For the losses whose objective is fixed (not GALA, whose ledger changes it during training)
this is the point a stage-2 run with ``sampler: instance`` converges to. It prints the val and
test top-1 and the objective of each solve, one per loss and weight decay, and names the weight
decay each loss scores best on val with (the converged classifier's regulariser, chosen
without the test set). For each ``--run`` (a stage-2 run on the same features) it prints that
run's plain top-1 (``results.json``: its best-on-val weights) beside the solve of its loss at
its weight decay and, for a linear head, what its ``final/`` weights reach: their objective (its
excess over the optimum's says how far SGD stopped from it) and their test top-1. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from gala_scale import metrics
from gala_scale.config import RunConfig, load_config
from gala_scale.losses import create_loss, data_needs, spec
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
        value = penalised(criterion, fc(x), y, fc.weight, weight_decay)
        value.backward()
        return value

    optimizer.step(objective)
    return Standardized(fc.float(), mean, std)


def penalised(criterion: nn.Module, logits, labels, weight, weight_decay: float) -> torch.Tensor:
    """The stage-2 objective: the mean loss plus ``weight_decay / 2 * |W|^2`` (float64)."""
    return criterion(logits, labels).double() + weight_decay / 2 * weight.double().pow(2).sum()


def objective_of(
    model: Standardized, features: torch.Tensor, labels: np.ndarray, loss: str, wd: float
) -> float:
    """The value of the stage-2 objective of ``loss`` at ``model`` (float64, no gradient)."""
    counts = np.bincount(labels, minlength=model.fc.out_features).tolist()
    weight, bias = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    with torch.no_grad():
        x = (features - model.mean.double()) / model.std.double()
        y = torch.from_numpy(labels.astype(np.int64))
        return float(penalised(loss_of(loss, counts), x @ weight.T + bias, y, weight, wd))


def final_classifier(run: Path, dim: int, classes: int) -> Standardized | None:
    """A stage-2 run's ``final/`` linear classifier (a raw one with mean 0 and std 1), or None
    for a head this solve does not cover (cosine: no bias)."""
    weights = load_file(run / "final" / "model.safetensors")
    fc = nn.Linear(dim, classes)
    if "mean" in weights:
        model = Standardized(fc, torch.zeros(dim), torch.ones(dim))
        if "fc.bias" not in weights:
            return None
        model.load_state_dict(weights)
        return model
    if "bias" not in weights:
        return None
    fc.load_state_dict(weights)
    return Standardized(fc, torch.zeros(dim), torch.ones(dim))


def _run_facts(run: Path) -> tuple[RunConfig, float]:
    """A finished run's configuration (``config.yaml``, defaults filled) and plain test top-1."""
    results = json.loads((run / "results.json").read_text())
    return load_config(run / "config.yaml"), results["test"]["plain"]["top1"]


def mismatch(cfg: RunConfig, standardized: bool) -> str | None:
    """Why the run's stage 2 minimised another objective than the solve does, or None."""
    defaults = RunConfig()
    changed = [
        f"loss.{key}={getattr(cfg.loss, key)!r}"
        for key in spec(cfg.loss.name).options
        if getattr(cfg.loss, key) != getattr(defaults.loss, key)
    ]
    checks = [
        (cfg.stage2.standardize != standardized, f"stage2.standardize={cfg.stage2.standardize}"),
        (cfg.stage2.sampler != "instance", f"stage2.sampler={cfg.stage2.sampler}"),
        (cfg.stage2.views > 0, f"stage2.views={cfg.stage2.views} (augmented views)"),
        (cfg.optim.name != "sgd", f"optim.name={cfg.optim.name} (decoupled weight decay)"),
        (cfg.optim.decay_norm_and_bias, "optim.decay_norm_and_bias=true"),
        (cfg.data.mixup > 0 or cfg.data.cutmix > 0, "data.mixup or data.cutmix"),
        (bool(changed), ", ".join(changed) + " (the solve takes the loss's defaults)"),
    ]
    found = [why for differs, why in checks if differs]
    return "; ".join(found) or None


def _top1(model: nn.Module, features: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(features.float()).argmax(1).numpy() == labels).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gala_scale.convex",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--features", type=Path, required=True, help="a feature cache version")
    p.add_argument("--losses", nargs="+", default=["ce", "balanced_softmax"])
    p.add_argument(
        "--weight-decay",
        type=float,
        nargs="+",
        default=[5e-4],
        help="one or more; with a val split cached, each loss's best on val is named",
    )
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
    val = _split(args.features, "val") if (args.features / "val.labels.npy").is_file() else None
    classes = int(max(train_y.max(), test_y.max())) + 1
    counts = np.bincount(train_y, minlength=classes).tolist()
    solved: dict[str, dict[str, dict]] = {}
    chosen = {}
    for loss in args.losses:
        solved[loss] = {}
        for wd in args.weight_decay:
            model = solve(train_x, train_y, loss, wd, args.max_iter, not args.raw, classes)
            with torch.no_grad():
                probs = torch.softmax(model(test_x.float()), 1)
            summary = metrics.summarize(probs, test_y, counts)
            row = {k: summary[k] for k in ("top1", "many", "medium", "few", "ece")}
            row["objective"] = objective_of(model, train_x, train_y, loss, wd)
            row["val_top1"] = None if val is None else _top1(model, *val)
            solved[loss][f"{wd:g}"] = row
            on_val = "" if val is None else f"val top-1 {100 * row['val_top1']:.2f} %, "
            print(
                f"L-BFGS {loss}, weight decay {wd:g}: {on_val}test top-1 "
                f"{100 * row['top1']:.2f} %, objective {row['objective']:.6f}",
                flush=True,
            )
        if val is not None:
            chosen[loss] = max(solved[loss], key=lambda wd: solved[loss][wd]["val_top1"])
            print(f"L-BFGS {loss}: weight decay {chosen[loss]} scores best on val", flush=True)
    runs = {}
    for run in args.run:
        cfg, top1 = _run_facts(run)
        loss, wd = cfg.loss.name, cfg.optim.weight_decay
        runs[str(run)] = {"loss": loss, "weight_decay": wd, "top1": top1}
        optimum = solved.get(loss, {}).get(f"{wd:g}")
        why = "no solve of its loss at its weight decay" if optimum is None else None
        why = why or mismatch(cfg, not args.raw)
        if why:
            runs[str(run)]["not_comparable"] = why
            print(f"{run}: {loss}, test top-1 {100 * top1:.2f} % (not comparable: {why})")
            continue
        gap = top1 - optimum["top1"]
        runs[str(run)]["minus_lbfgs"] = gap
        print(
            f"{run}: {loss}, weight decay {wd:g}, test top-1 {100 * top1:.2f} % "
            f"({100 * gap:+.2f} points against L-BFGS)",
            flush=True,
        )
        final = final_classifier(run, train_x.shape[1], classes)
        if final is None:
            continue
        value = objective_of(final, train_x, train_y, loss, wd)
        final_top1 = _top1(final, test_x, test_y)
        runs[str(run)].update(
            final_top1=final_top1,
            final_minus_lbfgs=final_top1 - optimum["top1"],
            objective=value,
            objective_excess=value - optimum["objective"],
        )
        print(
            f"  final/: test top-1 {100 * final_top1:.2f} % "
            f"({100 * (final_top1 - optimum['top1']):+.2f}), objective {value:.6f} "
            f"(+{value - optimum['objective']:.6f} over the optimum)",
            flush=True,
        )
    summary = {"standardized": not args.raw, "lbfgs": solved, "chosen_on_val": chosen}
    print(json.dumps({**summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
