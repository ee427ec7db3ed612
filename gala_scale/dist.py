"""The one module that talks to ``torch.distributed``.

Every helper degrades to the single-process answer when no process group is initialised, so
callers never guard collective calls themselves (an unconditional ``all_reduce`` breaks
single-process runs).
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place; the identity with one process."""
    if world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def destroy() -> None:
    """Tear the process group down (a gloo group left alive can abort the process at exit)."""
    if is_initialized():
        torch_dist.destroy_process_group()
