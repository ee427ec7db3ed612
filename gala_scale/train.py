"""Train a long-tailed classifier: ``python -m gala_scale.train`` or ``accelerate launch``.

    python -m gala_scale.train --config configs/debug.yaml                      # one process
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m gala_scale.train \\
        --config configs/debug.yaml run_dir=runs/ddp                            # 2 processes
    accelerate launch --config_file configs/accelerate/single_node_multi_gpu.yaml \\
        --use_deepspeed --deepspeed_config_file configs/deepspeed/zero2.json \\
        -m gala_scale.train --config configs/inat2018.yaml --resume auto

Overrides are ``key.sub=value`` (YAML values) after the options. The run directory receives the
resolved config, the git revision, metrics (JSON lines, TensorBoard), checkpoints, plots, the
best and final weights and ``results.json``. A run stopped by SIGTERM or SIGUSR1 checkpoints at
the next step and exits with code 99 (``EXIT_PREEMPTED``); ``--resume auto`` continues it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from gala_scale import dist, metrics, recipe
from gala_scale.checkpoint import (
    TrainState,
    checkpoint_name,
    newest_checkpoint,
    restore_ledger_delta,
    restore_loader_states,
    save_checkpoint,
    save_ledger_delta,
    save_loader_states,
    save_weights,
)
from gala_scale.config import ConfigError, RunConfig, describe, get, load_config, to_dict
from gala_scale.data import verify
from gala_scale.data.common import DataError, open_split
from gala_scale.data.mixing import Mixing, mixed
from gala_scale.engine import predict, sync_ledger, train_one_epoch
from gala_scale.report import finish
from gala_scale.run import Parts, Run
from gala_scale.runlog import RunLog
from gala_scale.runtime import (
    ExtensionLockTimeout,
    Guard,
    NonFiniteLoss,
    agreed_resume_point,
    check_shared_run_dir,
    check_world,
    configure_deepspeed,
    extension_wait_limit,
    make_accelerator,
    precision,
)
from gala_scale.shards.manifest import ManifestError
from gala_scale.stages import stage_of
from gala_scale.system import peak_rss_mib

EXIT_PREEMPTED = 99
EXIT_CONFIG = 2
EXIT_FAILED = 3  # a failure a restart would repeat (non-finite loss): not requeued


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gala_scale.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML config (configs/*.yaml)")
    parser.add_argument(
        "--resume",
        default="none",
        help="auto (newest complete checkpoint in run_dir), none, or a path",
    )
    parser.add_argument("--help-config", action="store_true", help="list every config key")
    parser.add_argument(
        "--get", metavar="KEY", help="print the resolved value of KEY (e.g. data.num_workers)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    return parser.parse_args(argv)


def _say(accelerator, message: str) -> None:
    """Print once per job (the global main process), not once per node."""
    if accelerator.is_main_process:
        print(message, flush=True)


def build_parts(
    cfg: RunConfig,
    accelerator,
    num_classes: int,
    counts: list[int],
    steps_per_epoch: int,
    model: torch.nn.Module | None = None,
) -> Parts:
    """The model (same initial weights on every rank), loss, optimizer and schedule, prepared."""
    cuda = accelerator.device.type == "cuda"
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if model is None:
        model = recipe.model(cfg, num_classes, accelerator.print)
    model = recipe.prepare_model(model, cfg, cuda, accelerator.num_processes)
    criterion = recipe.loss(cfg, num_classes, counts)
    optimizer = recipe.optimizer(model, cfg, cuda)
    scheduler = recipe.schedule(optimizer, cfg, steps_per_epoch)
    configure_deepspeed(accelerator, cfg)
    with extension_wait_limit():  # DeepSpeed's ops may build here
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = None
    if cfg.train.ema_decay:
        ema = recipe.WeightEMA(accelerator.unwrap_model(model), cfg.train.ema_decay)
    return Parts(
        recipe.compile_model(model, cfg),
        criterion.to(accelerator.device),
        optimizer,
        scheduler,
        ema,
    )


def build_run(cfg: RunConfig, accelerator) -> Run:
    """The run's stage builds its loaders and the module to train; the recipe the rest."""
    split = open_split(cfg.data.shards, cfg.data.train_split)
    num_classes = cfg.num_classes or split.num_classes
    counts = list(split.class_counts)
    recipe.set_backends(cfg, accelerator.device.type == "cuda")
    stage = stage_of(cfg)
    loaders = stage.loaders(cfg, accelerator, num_classes)
    torch.manual_seed(cfg.seed)
    model = stage.model(cfg, num_classes, loaders, accelerator.print)
    steps = loaders.train[0].steps_per_epoch
    parts = build_parts(cfg, accelerator, num_classes, counts, steps, model)
    return Run(cfg, accelerator, parts, loaders, counts, list(split.class_names))


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def _evaluate_val(run: Run, log: RunLog, state: TrainState, epoch: int) -> None:
    """Score val on the main process; every rank learns the score and saves ``best/`` with it."""
    probs, labels = predict(run.parts.eval_model, run.loaders.val.epoch(0))
    score = None
    if probs is not None:
        class_acc = metrics.per_class_accuracy(probs.argmax(1), labels, probs.shape[1])
        score = float(np.nanmean(class_acc))  # class-balanced: the selection metric
        log.write(
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


def _preempt(run: Run, state: TrainState, guard: Guard, mid_epoch: bool = False) -> int:
    """Checkpoint where training stands (unless that point is saved already) and say so."""
    acc, run_dir = run.accelerator, Path(run.cfg.run_dir)
    where = newest_checkpoint(run_dir) if dist.rank() == 0 else None
    where = dist.broadcast_object(where)
    if where is None or where.name != checkpoint_name(state):
        keep = run.cfg.train.keep_checkpoints
        where = save_checkpoint(acc, run_dir, state, keep, _rank_files(run, mid_epoch))
    _say(acc, f"stop requested (signal {guard.signal}): checkpoint {where}; --resume auto goes on")
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


def train_epochs(run: Run, state: TrainState, log: RunLog, guard: Guard) -> int:
    cfg, acc = run.cfg, run.accelerator
    for epoch in range(state.epoch, cfg.train.epochs):
        first = state.step if epoch == state.epoch else 0
        run.parts.criterion.start_epoch(epoch, cfg.train.epochs)
        result = _train_epoch(run, state, guard, epoch, first)
        state.global_step += result.steps
        if result.stopped:
            state.epoch, state.step = epoch, first + result.steps
            return _preempt(run, state, guard, mid_epoch=True)
        sync_ledger(run.parts.criterion)  # before any evaluation or checkpoint
        world_images = result.samples * acc.num_processes
        log.write(
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
            log.append_ledger(
                {k: v.numpy() for k, v in run.parts.criterion.ledger.tensors().items()}
            )
        if run.loaders.val is not None and _evaluates(cfg, epoch):
            _evaluate_val(run, log, state, epoch)
        state.epoch, state.step = epoch + 1, 0
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
            keep = cfg.train.keep_checkpoints
            save_checkpoint(acc, Path(cfg.run_dir), state, keep, _rank_files(run, False))
        _say(acc, f"epoch {epoch + 1}: loss {result.loss:.4f}, {result.seconds:.1f} s")
        if guard.stop_requested():  # a signal during evaluation or the checkpoint
            return _preempt(run, state, guard)
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


def _write_run_files(cfg: RunConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run_dir / "git_revision.txt").write_text(_git_revision() + "\n")


def _rank_record(run: Run, state: TrainState, code: int) -> None:
    """Each rank says who and where it was and which ledger it ended with (for checks)."""
    acc = run.accelerator
    ledger = None
    if run.parts.criterion.ledger is not None:
        raw = b"".join(v.numpy().tobytes() for v in run.parts.criterion.ledger.tensors().values())
        ledger = hashlib.sha256(raw).hexdigest()
    record = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "host": socket.gethostname(),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "ledger_sha256": ledger,
        "epoch": state.epoch,
        "step": state.step,
        "exit": code,
        "device": str(acc.device),
        "mixed_precision": precision(run.cfg),
        "loader": run.loaders.train[0].kind,
        "peak_rss_mib": peak_rss_mib(),
    }
    if acc.device.type == "cuda":
        record["peak_gpu_mib"] = torch.cuda.max_memory_allocated(acc.device) / 2**20
    _record_exit(run.cfg, code, acc.is_main_process)
    folder = Path(run.cfg.run_dir) / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{acc.process_index}.json").write_text(json.dumps(record, indent=1))


def _verify_shards(cfg: RunConfig, accelerator) -> None:
    """Each process hashes its share of the shard files that changed since the run last found
    them whole; any difference stops the run here, naming the sample (gala_scale.data.verify)."""
    d, run_dir = cfg.data, Path(cfg.run_dir)
    if not d.verify:
        return
    root, splits = Path(d.shards), [d.train_split, d.val_split, d.test_split]
    todo = verify.shards_to_check(root, splits, run_dir) if accelerator.is_main_process else None
    todo = dist.broadcast_object(todo)
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    problems = [
        p for found in dist.all_gather_object(verify.problems_of(root, mine)) for p in found
    ]
    verify.raise_if_any(problems, root)
    if accelerator.is_main_process and todo:
        verify.remember(root, todo, run_dir)


def run_training(cfg: RunConfig, accelerator, resume: str, guard: Guard) -> int:
    run_dir = Path(cfg.run_dir)
    check_shared_run_dir(run_dir, accelerator.device)
    checkpoint = agreed_resume_point(run_dir, resume)
    if accelerator.is_main_process:
        _write_run_files(cfg)
    try:
        _verify_shards(cfg, accelerator)
        run = build_run(cfg, accelerator)
    except (ValueError, FileNotFoundError) as err:
        # Before any training: a bad value, a missing file, data that cannot fill a batch. A
        # restart would meet it again, so it is a configuration error (exit 2, not requeued).
        raise ConfigError(str(err)) from None
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if run.parts.criterion.ledger is not None:
        accelerator.register_for_checkpointing(run.parts.criterion)
    if run.parts.ema is not None:
        accelerator.register_for_checkpointing(run.parts.ema)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        restore_ledger_delta(run.parts.criterion, accelerator, checkpoint)
        for problem in restore_loader_states(
            run.loaders.train, checkpoint, state.epoch, state.step
        ):
            print(f"warning: {problem}", file=sys.stderr, flush=True)
        _say(
            accelerator, f"resuming from {checkpoint} (epoch {state.epoch + 1}, step {state.step})"
        )
    log = RunLog(run_dir, accelerator.is_main_process, state.epoch)
    guard.device = accelerator.device
    try:
        code = train_epochs(run, state, log, guard)
        if code == 0 and not finish(run, state, guard):
            code = _preempt(run, state, guard)
        _rank_record(run, state, code)
    finally:
        log.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    # Installed first: a stop signal during start-up is honoured at the first check.
    with Guard() as guard:
        return _main(args, guard)


def _record_exit(cfg: RunConfig, code: int, main_process: bool) -> None:
    """``exit_status`` in the run directory, for the Slurm script (which requeues unless it
    says 2 or 3); written whole (temporary file, then rename)."""
    run_dir = Path(cfg.run_dir)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".exit_status.tmp-{os.getpid()}"
        tmp.write_text(f"{code}\n")
        tmp.replace(run_dir / "exit_status")


def _main(args: argparse.Namespace, guard: Guard) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if args.get:
            print(get(cfg, args.get))
            return 0
        accelerator = make_accelerator(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ExtensionLockTimeout as err:
        print(f"error: {err}", file=sys.stderr)
        _record_exit(cfg, EXIT_FAILED, os.environ.get("RANK", "0") == "0")
        return EXIT_FAILED
    world = accelerator.num_processes
    try:
        check_world(accelerator)
        code = run_training(cfg, accelerator, args.resume, guard)
    except (ConfigError, ManifestError, DataError, NonFiniteLoss, ExtensionLockTimeout) as err:
        # Deterministic: a requeue would fail the same way (slurm/inat_gala.sh stops on 2 and 3).
        # A missing or incomplete shard set is a configuration error too.
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_CONFIG if isinstance(err, ConfigError | ManifestError) else EXIT_FAILED
        _record_exit(cfg, code, accelerator.is_main_process)
    finally:
        accelerator.end_training()
        dist.destroy()  # an exception passing through leaves no group behind either
    return dist.leave(code, world)


if __name__ == "__main__":
    sys.exit(main())
