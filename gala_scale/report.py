"""The end of a run: the best-on-val model tested with and without PN, results and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from gala_scale import dist, metrics, publish, rebalance
from gala_scale.checkpoint import TrainState, save_weights
from gala_scale.engine import predict
from gala_scale.models.pretrained import PretrainedError, head_module
from gala_scale.run import Run
from gala_scale.runlog import RunLog


def table(results: dict) -> str:
    """The test results as a small fixed-width table (top-1, many, medium, few, in %)."""
    rows = [
        f"{'test (' + str(results['test_samples']) + ' images)':<34}{'top1':>7}{'many':>7}"
        f"{'medium':>8}{'few':>7}"
    ]
    for name, summary in results["test"].items():
        cells = [summary[k] for k in ("top1", "many", "medium", "few")]
        rows.append(
            f"{name:<34}"
            + "".join(
                f"{'-' if v is None else f'{100 * v:.1f}':>{w}}"
                for v, w in zip(cells, (7, 7, 8, 7), strict=True)
            )
        )
    return "\n".join(rows)


class MissingBest(RuntimeError):
    """Val selected an epoch and ``best/`` is gone: a rerun would meet the same."""


def _load_best(run: Run, state: TrainState) -> bool:
    """Load ``best/`` if rank 0 sees it (ranks listing a shared filesystem can disagree).

    A run that selected a best epoch (``state.best_epoch``) and finds no ``best/`` stops: its
    test results would silently be the final weights'."""
    best = Path(run.cfg.run_dir) / "best" / "model.safetensors"
    if not dist.broadcast_object(best.exists() if dist.rank() == 0 else None):
        if state.best_epoch >= 0:
            raise MissingBest(
                f"{best}: missing, though val selected epoch {state.best_epoch + 1}; the run "
                "directory lost it (its test would be of other weights than the selected ones)"
            )
        return False
    run.accelerator.unwrap_model(run.parts.eval_model).load_state_dict(load_file(best))
    return True


def finish(run: Run, state: TrainState, guard) -> bool:
    """Final weights, then the best-on-val model tested plain and with each post-hoc option
    (:func:`_score`); writes results.json, pn.json and the plots.

    Probabilities, PN and metrics live on the main process only. Returns False, having written
    no results, when a stop was requested meanwhile (checked between phases): the caller
    checkpoints and a resumed run does this again.
    """
    cfg, acc, run_dir = run.cfg, run.accelerator, Path(run.cfg.run_dir)
    final = {"epoch": cfg.train.epochs - 1, "ema_decay": cfg.train.ema_decay}
    save_weights(acc, run.parts.eval_model, run.parts.criterion, run_dir / "final", final)
    used_best = _load_best(run, state)
    if run.loaders.test is None:
        return True
    head = _linear_head(run)
    val = None
    if run.loaders.val is not None:
        if guard.stop_requested():
            return False
        val = predict(run.parts.eval_model, run.loaders.val.epoch(0), head)
    if guard.stop_requested():
        return False
    test = predict(run.parts.eval_model, run.loaders.test.epoch(0), head)
    if acc.is_main_process:
        results, scales, tau = _score(run, test, val, head)
        results.update(weights="best" if used_best else "final", best_epoch=state.best_epoch)
        _write(run, results, scales, tau)
    return True


def _linear_head(run: Run) -> nn.Linear | None:
    """The model's linear classifier (its weights for tau-norm), or None for any other head and
    for a compiled model (its graph, compiled before the hook, would not call the hook)."""
    if run.cfg.train.compile:
        return None
    model = run.accelerator.unwrap_model(run.parts.eval_model)
    try:
        head = head_module(model)
    except PretrainedError:
        return None
    return head if isinstance(head, nn.Linear) else None


def _score(run: Run, test: tuple, val: tuple | None, head: nn.Linear | None):
    """Test results of each variant: plain; PN with scales and tau fitted on val; the paper's
    transductive PN; post-hoc logit adjustment and the tau-normalised classifier, each with its
    tau fitted on val (Run.cfg.pn.tau where there is no val split)."""
    probs, labels = test[0], test[1]
    counts, scales, tau = run.class_counts, None, run.cfg.pn.tau
    variants = {"plain": probs}
    if val is not None:
        scales = rebalance.fit(val[0])
        if run.cfg.pn.fit_tau:
            tau = rebalance.fit_tau(val[0], val[1], scales)
        variants[f"PN, val scales, tau {tau:g}"] = rebalance.apply(probs, scales, tau)
    variants[f"PN, transductive on test, tau {tau:g}"] = rebalance.transductive(probs, tau)
    if val is not None and min(counts) > 0:  # the prior needs every class seen in training
        prior = rebalance.prior(counts)
        t = rebalance.best_tau(val[1], rebalance.adjusted_argmax(val[0], prior))
        variants[f"post-hoc LA, val tau {t:g}"] = rebalance.apply(probs, prior, t)
        if head is not None:
            weight = head.weight.detach().float().cpu().numpy()
            t = rebalance.best_tau(val[1], rebalance.normalised_argmax(val[2], weight))
            logits = torch.from_numpy(rebalance.tau_normalised(test[2], weight, t))
            variants[f"tau-norm, val tau {t:g}"] = torch.softmax(logits, 1).numpy()
    results = {k: metrics.summarize(v, labels, counts) for k, v in variants.items()}
    return {"test_samples": len(labels), "tau": tau, "test": results}, scales, tau


def _write_per_class(run: Run, results: dict, path: Path) -> None:
    """One row a class: its name, training images, test accuracy and positive predictions of
    each variant (plain and PN); what a spreadsheet or pandas reads at any number of classes."""
    variants = results["test"]
    header = ["class", "name", "train_images"]
    for name in variants:
        header += [f"accuracy: {name}", f"predicted: {name}"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for k, (name, count) in enumerate(zip(run.class_names, run.class_counts, strict=True)):
            row: list = [k, name, count]
            for v in variants.values():
                accuracy = v["per_class"][k]  # None: no test image of the class
                row += [
                    "" if accuracy is None else round(accuracy, 6),
                    v["positive_predictions"][k],
                ]
            writer.writerow(row)
    tmp.replace(path)


def _write(run: Run, results: dict, scales, tau: float) -> None:
    from gala_scale import plots  # matplotlib: only the process that writes imports it

    run_dir = Path(run.cfg.run_dir)
    publish.write_text(run_dir / "results.json", json.dumps(results, indent=1))
    if scales is not None:
        publish.write_text(
            run_dir / "pn.json",
            json.dumps(
                {
                    "scales": [float(s) for s in scales],
                    "tau": tau,
                    "fitted_on": run.cfg.data.val_split,
                    "class_names": run.class_names,
                },
                indent=1,
            ),
        )
    _write_per_class(run, results, run_dir / "per_class.csv")
    (run_dir / "plots").mkdir(exist_ok=True)
    variants = list(results["test"].values())
    plain, pn = variants[0], variants[1]
    plots.per_class_accuracy(
        run.class_counts,
        plain["per_class"],
        pn["per_class"],
        run_dir / "plots" / "per_class_accuracy.png",
    )
    plots.positive_predictions(
        run.class_counts,
        plain["positive_predictions"],
        pn["positive_predictions"],
        run_dir / "plots" / "positive_predictions.png",
    )
    plots.reliability(results["test"], run_dir / "plots" / "reliability.png")
    run_log = RunLog(run_dir, False, 0)
    records = run_log.records()
    if records:
        plots.training_curves(records, run_dir / "plots" / "training.png")
    history = run_log.ledger_history()
    if history is not None:
        plots.ledger(history, run.class_counts, run_dir / "plots" / "ledger.png")
    print(table(results), flush=True)
