"""The run's epochs: train each, sync the ledger, log, score val, checkpoint, and stop cleanly
on a signal (a mid-epoch checkpoint with every rank's unsynced ledger delta)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gala_scale import dist, metrics
from gala_scale.checkpoint import (
    TrainState,
    checkpoint_name,
    newest_checkpoint,
    save_checkpoint,
    save_ledger_delta,
    save_loader_states,
    save_weights,
)
from gala_scale.config import RunConfig
from gala_scale.data.mixing import Mixing, mixed
from gala_scale.engine import predict, sync_ledger, train_one_epoch
from gala_scale.logs import get_logger
from gala_scale.run import Run
from gala_scale.rundir import EXIT_PREEMPTED
from gala_scale.runlog import RunLog
from gala_scale.runtime import Guard

log = get_logger(__name__)


def _epoch_batches(run: Run, epoch: int, first_step: int):
    """This process's batches; with emulate_world > 1 the virtual ranks' batches concatenated."""
    d = run.cfg.data
    mixing = Mixing(d.mixup, d.cutmix, d.mix_prob, d.mix_switch_prob)
    streams = [
        mixed(
            loader.epoch(epoch, start_step=first_step),
            mixing,
            len(run.class_counts),
            seed=run.cfg.seed,
            epoch=epoch,
            first_step=first_step,
            rank=loader.rank,
        )
        for loader in run.loaders.train
    ]
    if len(streams) == 1:
        return streams[0]
    return (
        (torch.cat(xs), torch.cat(ys))
        for xs, ys in (zip(*parts, strict=True) for parts in zip(*streams, strict=True))
    )


def _evaluate_val(run: Run, run_log: RunLog, state: TrainState, epoch: int) -> None:
    """Score val on the main process; every rank learns the score and saves ``best/`` with it."""
    probs, labels = predict(run.parts.eval_model, run.loaders.val.epoch(0))
    score = None
    if probs is not None:
        class_acc = metrics.per_class_accuracy(probs.argmax(1), labels, probs.shape[1])
        score = float(np.nanmean(class_acc))  # class-balanced: the selection metric
        run_log.write(
            {
                "type": "val",
                "epoch": epoch,
                "top1": metrics.top1(probs.argmax(1), labels),
                "mean_class_acc": score,
                **metrics.group_accuracy(class_acc, run.class_counts),
            }
        )
    score = dist.broadcast_object(score)
    if score > state.best_metric:
        state.best_metric, state.best_epoch = score, epoch
        save_weights(
            run.accelerator,
            run.parts.eval_model,
            run.parts.criterion,
            Path(run.cfg.run_dir) / "best",
            {"epoch": epoch, "val_mean_class_acc": score},
        )


def _rank_files(run: Run, mid_epoch: bool):
    """What each process adds to a checkpoint: where its training loaders stand and, mid-epoch,
    its unsynced ledger delta (so the resumed run computes exactly what an uninterrupted one
    would)."""

    def write(folder: Path, rank: int) -> None:
        save_loader_states(run.loaders.train, folder)
        if mid_epoch:
            save_ledger_delta(run.parts.criterion, folder, rank)

    return write


def preempt(run: Run, state: TrainState, guard: Guard, mid_epoch: bool = False) -> int:
    """Checkpoint where training stands (unless that point is saved already) and say so."""
    acc, run_dir = run.accelerator, Path(run.cfg.run_dir)
    where = newest_checkpoint(run_dir) if dist.rank() == 0 else None
    where = dist.broadcast_object(where)
    if where is None or where.name != checkpoint_name(state):
        keep = run.cfg.train.keep_checkpoints
        where = save_checkpoint(acc, run_dir, state, keep, _rank_files(run, mid_epoch))
    log.info(
        "stop requested (signal %s): checkpoint %s; --resume auto goes on", guard.signal, where
    )
    return EXIT_PREEMPTED


def _train_epoch(run: Run, state: TrainState, guard: Guard, epoch: int, first: int):
    cfg, acc = run.cfg, run.accelerator
    bar = tqdm(
        total=run.loaders.train[0].steps_per_epoch,
        initial=first,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=None if acc.is_main_process else True,
        leave=False,
        file=sys.stderr,
    )
    done = first

    def on_check(step: int, loss: float) -> None:
        nonlocal done
        bar.update(step + 1 - done)
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1

    batches = _epoch_batches(run, epoch, first)
    result = train_one_epoch(
        run.parts.model,
        run.parts.criterion,
        run.parts.optimizer,
        run.parts.scheduler,
        batches,
        acc,
        guard,
        first_step=first,
        sync_every=cfg.train.sync_every_steps,
        check_every=cfg.train.log_every,
        on_check=on_check,
        ema=run.parts.ema,
    )
    bar.close()
    if result.stopped and first + result.steps == run.loaders.train[0].steps_per_epoch:
        # A stop seen at the epoch's last check did not leave the epoch early: running the
        # (empty) streams out lets each loader end its epoch, and the caller finishes it (ledger
        # sync, val, epoch checkpoint) before its after-epoch stop check preempts. A mid-epoch
        # checkpoint at the epoch's end would resume into an epoch with nothing left.
        for _ in batches:
            pass
        result = replace(result, stopped=False)
    return result


def train_epochs(run: Run, state: TrainState, run_log: RunLog, guard: Guard) -> int:
    cfg, acc = run.cfg, run.accelerator
    for epoch in range(state.epoch, cfg.train.epochs):
        first = state.step if epoch == state.epoch else 0
        run.parts.criterion.start_epoch(epoch, cfg.train.epochs)
        result = _train_epoch(run, state, guard, epoch, first)
        state.global_step += result.steps
        if result.stopped:
            state.epoch, state.step = epoch, first + result.steps
            return preempt(run, state, guard, mid_epoch=True)
        sync_ledger(run.parts.criterion)  # before any evaluation or checkpoint
        world_images = result.samples * acc.num_processes
        run_log.write(
            {
                **_ledger_metrics(run.parts.criterion),
                "type": "train",
                "epoch": epoch,
                "loss": result.loss,
                "steps": result.steps,
                "lr": run.parts.scheduler.get_last_lr()[0],
                "seconds": result.seconds,
                "images_per_s": world_images / max(result.seconds, 1e-9),
            }
        )
        if run.parts.criterion.ledger is not None:
            run_log.append_ledger(
                {k: v.numpy() for k, v in run.parts.criterion.ledger.tensors().items()}
            )
        if run.loaders.val is not None and _evaluates(cfg, epoch):
            _evaluate_val(run, run_log, state, epoch)
        state.epoch, state.step = epoch + 1, 0
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
            keep = cfg.train.keep_checkpoints
            save_checkpoint(acc, Path(cfg.run_dir), state, keep, _rank_files(run, False))
        log.info("epoch %d: loss %.4f, %.1f s", epoch + 1, result.loss, result.seconds)
        if guard.stop_requested():  # a signal during evaluation or the checkpoint
            return preempt(run, state, guard)
    return 0


def _evaluates(cfg: RunConfig, epoch: int) -> bool:
    """Whether val is scored after ``epoch``: every ``train.eval_every`` epochs, or with 0
    after the last epoch only (so ``best/`` is then the final weights, scored)."""
    every, last = cfg.train.eval_every, epoch + 1 == cfg.train.epochs
    return (epoch + 1) % every == 0 if every else last


def _ledger_metrics(criterion) -> dict:
    """What GALA's logits take, in a number an epoch: the spread of ``log(theta + eps)`` over the
    classes (of S with ``loss.ledger: sum_of_sums``), which lambda1 scales into the widest
    logit offset between two classes."""
    if criterion.ledger is None:
        return {}
    return {
        "ledger": criterion.ledger.kind,
        "ledger_log_range": criterion.ledger.log_range(criterion.eps),
    }
