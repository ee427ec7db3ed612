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
import contextlib
import os
import sys
from pathlib import Path

import torch

from gala_scale import dist, publish, recipe
from gala_scale.checkpoint import (
    TrainState,
    restore_ledger_delta,
    restore_loader_states,
)
from gala_scale.config import ConfigError, RunConfig, describe, get, load_config
from gala_scale.data import verify
from gala_scale.data.common import DataError, open_split
from gala_scale.epochs import preempt, train_epochs
from gala_scale.logs import get_logger, setup
from gala_scale.report import MissingBest, finish
from gala_scale.run import Parts, Run
from gala_scale.rundir import (
    EXIT_CONFIG,
    EXIT_FAILED,
    rank_record,
    record_exit,
    write_run_files,
)
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
)
from gala_scale.shards.manifest import ManifestError
from gala_scale.stages import stage_of

log = get_logger("gala_scale.train")  # not __name__: run as __main__ by python -m


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
        model = recipe.model(cfg, num_classes, log.info)
    model = recipe.prepare_model(model, cfg, cuda, accelerator.num_processes)
    criterion = recipe.loss(cfg, num_classes, counts)
    optimizer = recipe.optimizer(model, cfg, cuda)
    scheduler = recipe.schedule(optimizer, cfg, steps_per_epoch)
    configure_deepspeed(accelerator, cfg)
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    with extension_wait_limit() if deepspeed else contextlib.nullcontext():  # its ops build here
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
    model = stage.model(cfg, num_classes, loaders, log.info)
    steps = loaders.train[0].steps_per_epoch
    parts = build_parts(cfg, accelerator, num_classes, counts, steps, model)
    return Run(cfg, accelerator, parts, loaders, counts, list(split.class_names))


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
        write_run_files(cfg)
        for folder in ("best", "final"):  # what an interrupted swap left, put right first
            publish.recover(run_dir / folder)
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
        try:
            accelerator.load_state(str(checkpoint))
        except ValueError as err:  # the optimizer's groups of another version: every restart
            raise ConfigError(
                f"{checkpoint}: its state does not fit this run's ({err}); it was saved by "
                "another version of gala-scale (e.g. before the optimizer's norm/bias groups): "
                "resume it with that version, or start a fresh run_dir"
            ) from None
        restore_ledger_delta(run.parts.criterion, accelerator, checkpoint)
        for problem in restore_loader_states(
            run.loaders.train, checkpoint, state.epoch, state.step
        ):
            log.warning("%s", problem, main_process_only=False)
        log.info("resuming from %s (epoch %d, step %d)", checkpoint, state.epoch + 1, state.step)
    run_log = RunLog(run_dir, accelerator.is_main_process, state.epoch, accelerator)
    guard.device = accelerator.device
    try:
        code = train_epochs(run, state, run_log, guard)
        if code == 0 and not finish(run, state, guard):
            code = preempt(run, state, guard)
        rank_record(run, state, code)
    finally:
        run_log.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    setup()
    # Installed first: a stop signal during start-up is honoured at the first check.
    with Guard() as guard:
        return _main(args, guard)


def _main(args: argparse.Namespace, guard: Guard) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if args.get:
            print(get(cfg, args.get))
            return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        accelerator = make_accelerator(cfg)
    except (ConfigError, ExtensionLockTimeout) as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, ExtensionLockTimeout):
            return 1  # a restart builds in a fresh folder (slurm/inat_gala.sh): requeued
        record_exit(cfg, EXIT_CONFIG, os.environ.get("RANK", "0") == "0")
        return EXIT_CONFIG
    world = accelerator.num_processes
    try:
        check_world(accelerator)
        code = run_training(cfg, accelerator, args.resume, guard)
    except (ConfigError, ManifestError, DataError, NonFiniteLoss, MissingBest) as err:
        # Deterministic: a requeue would fail the same way (slurm/inat_gala.sh stops on 2 and 3).
        # A missing or incomplete shard set is a configuration error too. The rank that met it
        # records it (a DataError can be another rank's while rank 0 waits in a collective).
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_CONFIG if isinstance(err, ConfigError | ManifestError) else EXIT_FAILED
        record_exit(cfg, code, True)
    except ExtensionLockTimeout as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    finally:
        accelerator.end_training()
        dist.destroy()  # an exception passing through leaves no group behind either
    return dist.leave(code, world)


if __name__ == "__main__":
    sys.exit(main())
