"""The one module that talks to ``torch.distributed``.

Every helper degrades to the single-process answer when no process group is initialised, so
callers never guard collective calls themselves (an unconditional ``all_reduce`` breaks
single-process runs).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place; the identity with one process."""
    if world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; a collective)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order (picklable objects; a collective)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def gather_to_main(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape on all ranks) on rank 0, in rank order; None elsewhere.

    Unlike an all-gather, only rank 0 holds the whole result (an evaluation of 24k x 8,142
    probabilities is 0.8 GB a rank with all-gather).
    """
    if world_size() == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(world_size())] if rank() == 0 else None
    torch_dist.gather(tensor.contiguous(), parts, dst=0)
    return parts


def destroy() -> None:
    """Tear the process group down (a gloo group left alive can abort the process at exit)."""
    if is_initialized():
        torch_dist.destroy_process_group()


def leave(code: int, world: int) -> int:
    """End a launched process: the group torn down, output flushed, and with ``world`` > 1 an
    exit without Python's exit handlers, where gloo can abort a finished process
    ("terminate called without an active exception"). Returns ``code`` when ``world`` is 1."""
    destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    if world > 1:
        os._exit(code)
    return code
