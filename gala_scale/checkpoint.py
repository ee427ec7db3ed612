"""Checkpoints: whole training state, written atomically, found again on resume.

A checkpoint is ``accelerator.save_state`` output (model as safetensors, optimizer, scheduler,
grad scaler, RNG states of every process, DeepSpeed's own files under DeepSpeed) plus the
registered custom state (the GALA ledger, :class:`TrainState`), and each rank's files: its training
loader's position (``loader_rank<r>.json``, DALI only) and, mid-epoch, its unsynced ledger
delta. It is written into
``checkpoints/.tmp-<name>``, flushed to disk and renamed to ``checkpoints/<name>`` by the main
process once every process has finished writing, so a directory without a ``.`` prefix is
always complete; a kill during the write leaves only a ``.tmp-`` folder, which is never read
and is removed later. The same point saved twice is swapped in whole (an atomic exchange,
:mod:`gala_scale.publish`), and an old checkpoint is renamed to ``.trash-<name>`` before it is
removed, so no kill leaves a half-removed folder under a checkpoint's name. Names are
``e<epoch>-s<step>``: the epoch and the step within it at which training resumes.

``best/`` and ``final/`` are published the same way (:func:`save_weights`): at every instant
the folder is the old one or the new one, whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from gala_scale import publish

NAME = re.compile(r"^e(\d{4})-s(\d{6})$")
STATE_FILE = "train_state.json"
DELTA_FILE = "ledger_delta_rank{}.safetensors"
LOADER_FILE = "loader_rank{}.json"  # a training loader's position (DALI pipeline state)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch to run next (or the one interrupted)
    step: int = 0  # the step within ``epoch`` to resume at
    global_step: int = 0
    best_metric: float = -1.0
    best_epoch: int = -1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_name(state: TrainState) -> str:
    return f"e{state.epoch:04d}-s{state.step:06d}"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: tuple(int(g) for g in NAME.match(p.name).groups()))


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator,
    run_dir: Path,
    state: TrainState,
    keep: int,
    per_rank: Callable[[Path, int], None] | None = None,
) -> Path:
    """Write the full training state; every process must call this at the same point.

    ``per_rank(folder, rank)`` lets every process add its own files before the rename.
    """
    root = checkpoint_root(run_dir)
    name = checkpoint_name(state)
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".trash-*")]:  # a killed save's
            shutil.rmtree(stale, ignore_errors=True)
        for aside in {p.name[1:].partition(".old-")[0] for p in root.glob(".*.old-*")}:
            publish.recover(root / aside)  # a swap without the exchange, killed half-way
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if per_rank is not None:
        per_rank(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=1))
        # The same point saved twice (a repeated stop request) is swapped in whole; tmp then
        # holds the old one.
        publish.publish(tmp, final)
        shutil.rmtree(tmp, ignore_errors=True)
        for old in complete_checkpoints(run_dir)[:-keep]:
            trash = old.with_name(f".trash-{old.name}")
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: auto (newest complete, or None), none, or a folder.

    ``none`` refuses a run directory that already holds checkpoints, so nothing is overwritten
    by accident.
    """
    newest = newest_checkpoint(run_dir)
    if resume == "auto":
        return newest
    if resume == "none":
        if newest is not None:
            raise ValueError(
                f"{run_dir} already holds checkpoints (newest {newest.name}); pass "
                "--resume auto to continue it, or choose another run_dir"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint folder")
    return path


def save_weights(accelerator, model, criterion, folder: Path, extra: dict) -> None:
    """Model weights (safetensors, no pickle), the GALA ledger and ``extra`` into ``folder``.

    Every process calls it (gathering the state dict can be a collective); the main one writes,
    into a temporary folder that is then swapped in whole (:func:`gala_scale.publish.staged`).
    """
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    with publish.staged(folder) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, tmp / "model.safetensors")
        if criterion.ledger is not None:
            save_file(criterion.ledger.tensors(), tmp / "ledger.safetensors")
        (tmp / "info.json").write_text(json.dumps(extra, indent=1))


def save_ledger_delta(criterion, folder: Path, rank: int) -> None:
    """This rank's unsynced GALA ledger delta, for a mid-epoch checkpoint."""
    if criterion.ledger is not None:
        save_file(criterion.ledger.delta_state(), folder / DELTA_FILE.format(rank))


def restore_ledger_delta(criterion, accelerator, checkpoint: Path) -> None:
    """Give each rank back its own unsynced ledger delta from a mid-epoch checkpoint.

    With another number of processes than the checkpoint's, all deltas are folded into the
    shared ledger instead (what a sync would have done).
    """
    files = sorted(checkpoint.glob(DELTA_FILE.format("*")))
    if not files or criterion.ledger is None:
        return
    try:
        if len(files) == accelerator.num_processes:
            own = checkpoint / DELTA_FILE.format(accelerator.process_index)
            criterion.ledger.load_delta(load_file(own))
        else:
            criterion.ledger.fold_deltas([load_file(path) for path in files])
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err}") from None


def save_loader_states(loaders, folder: Path) -> None:
    """Where each of this process's training loaders stands (nothing for the torch loader)."""
    for loader in loaders:
        state = loader.state()
        if state is not None:
            (folder / LOADER_FILE.format(loader.rank)).write_text(json.dumps(state))


def restore_loader_states(loaders, checkpoint: Path, epoch: int, step: int) -> list[str]:
    """Put each DALI training loader back where the checkpoint left it.

    Returns what could not be restored, to be said: such a loader starts a pipeline seeded from
    ``(seed, epoch, rank)`` and decodes the batches before ``step`` to skip them.
    """
    problems = []
    for loader in loaders:
        if loader.kind != "dali":
            continue
        path = checkpoint / LOADER_FILE.format(loader.rank)
        fallback = f"rank {loader.rank} reads epoch {epoch + 1} afresh, decoding {step} batches"
        if not path.is_file():
            problems.append(f"{path}: missing; {fallback}")
            continue
        state = json.loads(path.read_text())
        if (state.get("epoch"), state.get("step")) != (epoch, step):
            problems.append(
                f"{path}: saved at epoch {state.get('epoch')} step {state.get('step')}, "
                f"not at the checkpoint's epoch {epoch} step {step}; {fallback}"
            )
            continue
        try:
            loader.restore(state)
        except (ValueError, KeyError) as err:
            problems.append(f"{path}: {err}; {fallback}")
    return problems
