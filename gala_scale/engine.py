"""The training and evaluation loops: explicit parameters, no globals.

Nothing here touches devices, process groups or gradients beyond ``accelerator.backward``,
``optimizer.step`` and ``accelerator.gather``; the caller (``gala_scale.train``) wires them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gala_scale.data import PAD_LABEL


@dataclass
class EpochResult:
    steps: int  # steps run in this call
    loss: float  # mean training loss over them
    samples: int  # samples this process trained on
    seconds: float
    stopped: bool  # left early because a stop was requested


def sync_ledger(criterion: nn.Module) -> None:
    """Fold every rank's GALA ledger delta into the shared ledger (a collective; no-op else)."""
    if hasattr(criterion, "sync"):
        criterion.sync()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer,
    scheduler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accelerator,
    *,
    epoch: int,
    first_step: int,
    sync_every: int,
    input_dtype: torch.dtype | None,
    stop_requested: Callable[[], bool],
    on_step: Callable[[int, float], None] | None = None,
) -> EpochResult:
    """Train over ``batches`` (which start at ``first_step`` of the epoch)."""
    model.train()
    criterion.train()
    start, steps, samples, stopped = time.perf_counter(), 0, 0, False
    loss_sum = torch.zeros((), device=accelerator.device)
    for step, (images, labels) in enumerate(batches, start=first_step):
        if input_dtype is not None:
            images = images.to(input_dtype)
        loss = criterion(model(images), labels)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        steps, samples = steps + 1, samples + len(labels)
        if sync_every and (step + 1) % sync_every == 0:
            sync_ledger(criterion)
        if on_step is not None:
            on_step(step, loss.detach())
        if stop_requested():  # a collective: every rank asks at every step
            stopped = True
            break
    mean_loss = float(loss_sum) / max(steps, 1)  # note: one device-to-host sync an epoch
    if not np.isfinite(mean_loss):
        raise FloatingPointError(
            f"training loss became non-finite in epoch {epoch}; stopping. Lower the learning rate "
            "or check the data."
        )
    return EpochResult(
        steps,
        mean_loss,
        samples,
        time.perf_counter() - start,
        stopped,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accelerator,
    input_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels of every sample, gathered from all ranks (pads dropped)."""
    model.eval()
    all_probs, all_labels = [], []
    for images, labels in batches:
        if input_dtype is not None:
            images = images.to(input_dtype)
        logits = model(images).float()
        logits, labels = accelerator.gather((logits, labels))
        keep = labels != PAD_LABEL
        all_probs.append(torch.softmax(logits[keep], dim=1).cpu())
        all_labels.append(labels[keep].cpu())
    return torch.cat(all_probs).numpy(), torch.cat(all_labels).numpy()
