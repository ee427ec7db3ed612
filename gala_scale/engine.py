"""The training and evaluation loops: explicit parameters, no globals.

Nothing here touches devices or gradients beyond ``accelerator.backward`` and ``optimizer.step``;
collectives go through ``gala_scale.dist`` and the caller (``gala_scale.epochs``) wires them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gala_scale import dist
from gala_scale.data import PAD_LABEL


@dataclass
class EpochResult:
    steps: int  # steps run in this call
    loss: float  # mean training loss over them, over every rank
    samples: int  # samples this process trained on
    seconds: float
    stopped: bool  # left early because a stop was requested


def sync_ledger(criterion: nn.Module) -> None:
    """Fold every rank's GALA ledger delta into the shared ledger (a collective; no-op else)."""
    if criterion.ledger is not None:
        criterion.ledger.sync()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer,
    scheduler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accelerator,
    guard,
    *,
    first_step: int,
    sync_every: int,
    check_every: int,
    on_check: Callable[[int, float], None] | None = None,
    ema=None,
) -> EpochResult:
    """Train over ``batches`` (which start at ``first_step`` of the epoch).

    Nothing here reads a device value back on the host except ``guard.check``, every
    ``check_every`` steps and once at the end: it raises on a non-finite loss seen by any rank and
    says whether any rank was asked to stop. ``on_check(step, mean loss since the last check)``
    reports progress at those points only. ``ema`` (a weight average) is updated after every
    optimizer step.
    """
    model.train()
    criterion.train()
    start, steps, samples, stopped = time.perf_counter(), 0, 0, False
    loss_sum = torch.zeros((), device=accelerator.device)
    window = torch.zeros((), device=accelerator.device)  # loss since the last check
    for step, (images, labels) in enumerate(batches, start=first_step):
        with accelerator.accumulate(model):
            loss = criterion(model(images), labels)
            accelerator.backward(loss)
            optimizer.step()  # skipped by Accelerate between accumulation boundaries
            if accelerator.sync_gradients:
                scheduler.step()
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))
            optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        guard.watch(loss)
        loss_sum += loss
        window += loss
        steps, samples = steps + 1, samples + len(labels)
        if sync_every and (step + 1) % sync_every == 0:
            sync_ledger(criterion)
        if (step + 1) % check_every == 0:
            stopped, mean = guard.check(window / check_every)  # note: the one sync point
            window.zero_()
            if on_check is not None:
                on_check(step, mean)
            if stopped:
                break
    if not stopped and steps and (first_step + steps) % check_every:
        stopped, _ = guard.check(window)  # the steps since the last check (a sync an epoch)
    # The mean over every rank's steps: each rank's loss is of its own samples. Every rank ran
    # the same steps (the guard's checks stop them together), so this collective always pairs.
    total, total_steps = dist.all_reduce_sum_(
        torch.stack([loss_sum.float(), loss_sum.new_tensor(steps)])
    ).tolist()  # note: a sync point, once an epoch
    return EpochResult(
        steps,
        total / max(total_steps, 1.0),
        samples,
        time.perf_counter() - start,
        stopped,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    head: nn.Linear | None = None,
) -> tuple:
    """Softmax probabilities and labels of every sample of every rank, on the main process only;
    with ``head`` (the model's linear classifier) also its inputs, the features, third.

    Other ranks get ``None`` for each: they send their batches to rank 0 and keep nothing, so
    the (samples, classes) matrix exists once per job. Every rank must run the same number of
    batches (eval loaders pad; pads are dropped here).
    """
    model.eval()
    rows_of: dict[str, list] = {"probs": [], "labels": [], "features": []}
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) if head else None
    try:
        for images, labels in batches:
            probs = torch.softmax(model(images).float(), dim=1)
            parts = [probs, labels[:, None].to(probs.dtype)]
            if head is not None:
                parts.append(seen.pop().float().flatten(1))
            gathered = dist.gather_to_main(torch.cat(parts, 1))
            if gathered is None:
                continue
            rows = torch.cat(gathered).cpu()
            k = probs.shape[1]
            labels = rows[:, k].long()
            keep = labels != PAD_LABEL
            rows_of["probs"].append(rows[keep, :k])
            rows_of["labels"].append(labels[keep])
            rows_of["features"].append(rows[keep, k + 1 :])
    finally:
        if hook is not None:
            hook.remove()
    names = ("probs", "labels", "features") if head is not None else ("probs", "labels")
    if dist.rank() != 0:
        return (None,) * len(names)
    return tuple(torch.cat(rows_of[n]).numpy() for n in names)
