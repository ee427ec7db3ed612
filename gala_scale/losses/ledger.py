"""The per-class gradient ledger of GALA: theta and phi, and their distributed algebra.

``theta_j`` is the accumulated positive gradient of class j and ``phi_k`` the accumulated
negative gradient produced by samples of class k (docs/losses.md). The loss that owns a ledger
computes the increments (:mod:`gala_scale.losses.gala`); the ledger keeps them, in float64.

Two kinds (``kind=``):

* ``"sum"``: the logits take theta and phi, the running sums.
* ``"sum_of_sums"``: the logits take ``S_theta`` and ``S_phi``, the running sums of those running
  sums, ``S_t = S_(t-1) + theta_t`` at every training call (the authors' code). Kept as per-class
  vectors, never (K, K).

Distributed: the ledger is ``global + delta``. ``global`` is what all ranks agreed on at the last
:meth:`GradientLedger.sync`; ``delta`` is what this rank accumulated since. Readers see both.
``sync`` all-reduces the deltas (SUM) and folds them into ``global``, so every rank ends with the
ledger one process would have accumulated from the same samples. Call it at the same points on
every rank and before any checkpoint. With ``sum_of_sums`` one global step adds the global theta
to S, so each rank also keeps ``E``, the running sum of its own theta delta, and counts its steps
n since the sync: then ``S = S_global + n * theta_global + E`` on each rank, and the sync folds
``n * theta_global + sum_r E_r`` into ``S_global`` (derivation: docs/losses.md).

Checkpoints: the buffers are the module's state dict (global and delta, restored together on the
same rank of the same world); :meth:`delta_state` / :meth:`load_delta` / :meth:`fold_deltas` move
one rank's unsynced part, and :meth:`tensors` is what a weights folder keeps.
"""

from __future__ import annotations

import torch
from torch import nn

from gala_scale import dist

KINDS = ("sum", "sum_of_sums")
# Buffers of the sum_of_sums ledger: S = S_global + steps * theta_global + S_delta.
SUM_BUFFERS = ("s_theta_global", "s_phi_global", "s_theta_delta", "s_phi_delta")


class GradientLedger(nn.Module):
    """Per-class accumulated positive (theta) and negative (phi) gradients, float64 buffers."""

    def __init__(self, num_classes: int, kind: str = "sum") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown GALA ledger {kind!r}; valid: {', '.join(KINDS)}")
        self.num_classes = num_classes
        self.kind = kind
        for name in ("theta_global", "phi_global", "theta_delta", "phi_delta"):
            self.register_buffer(name, torch.zeros(num_classes, dtype=torch.float64))
        if kind == "sum_of_sums":
            for name in SUM_BUFFERS:
                self.register_buffer(name, torch.zeros(num_classes, dtype=torch.float64))
            # Training calls since the last sync: equal on every rank (float64 for the products).
            self.register_buffer("steps_since_sync", torch.zeros((), dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, kind={self.kind!r}"

    @property
    def theta(self) -> torch.Tensor:
        """Effective accumulated positive gradient per class (global + unsynced delta)."""
        return self.theta_global + self.theta_delta

    @property
    def phi(self) -> torch.Tensor:
        """Effective accumulated negative gradient per class (global + unsynced delta)."""
        return self.phi_global + self.phi_delta

    @property
    def logit_theta(self) -> torch.Tensor:
        """What the logits take for theta: theta itself, or S_theta with ``sum_of_sums``."""
        if self.kind == "sum":
            return self.theta
        return self.s_theta_global + self.steps_since_sync * self.theta_global + self.s_theta_delta

    @property
    def logit_phi(self) -> torch.Tensor:
        """What the logits take for phi: phi itself, or S_phi with ``sum_of_sums``."""
        if self.kind == "sum":
            return self.phi
        return self.s_phi_global + self.steps_since_sync * self.phi_global + self.s_phi_delta

    @torch.no_grad()
    def seed(self, values: torch.Tensor) -> None:
        """Start theta and phi (and S, as one step of them) at ``values``, on every rank alike."""
        names = ["theta_global", "phi_global"]
        if self.kind == "sum_of_sums":
            names += ["s_theta_global", "s_phi_global"]
        for name in names:
            getattr(self, name).copy_(values)

    @torch.no_grad()
    def add(self, positive: torch.Tensor, negative: torch.Tensor) -> None:
        """Add one call's per-class increments (K,) to this rank's delta."""
        self.theta_delta += positive.double()
        self.phi_delta += negative.double()

    @torch.no_grad()
    def add_per_sample(self, increments: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a (B,) increment to both theta and phi of each sample's class (hard labels)."""
        increments = increments.double()
        self.theta_delta.index_add_(0, targets, increments)
        self.phi_delta.index_add_(0, targets, increments)

    @torch.no_grad()
    def end_step(self) -> None:
        """With ``sum_of_sums``, one step of S: S grows by this step's theta (and phi), which on
        this rank is ``n * theta_global`` (added at the sync) plus the local delta, summed into E.
        """
        if self.kind == "sum":
            return
        self.s_theta_delta += self.theta_delta
        self.s_phi_delta += self.phi_delta
        self.steps_since_sync += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        """The ledger as a file keeps it: theta and phi, and with ``sum_of_sums`` S_theta and
        S_phi (``s_theta``, ``s_phi``), what the logits use; on the CPU."""
        tensors = {"theta": self.theta.cpu(), "phi": self.phi.cpu()}
        if self.kind == "sum_of_sums":
            tensors |= {"s_theta": self.logit_theta.cpu(), "s_phi": self.logit_phi.cpu()}
        return tensors

    def log_range(self, eps: float) -> float:
        """The spread of ``log(theta + eps)`` over the classes (of S with ``sum_of_sums``): what
        a weight on it turns into the widest logit offset between two classes."""
        logs = torch.log(self.logit_theta + eps)
        return float(logs.max() - logs.min())

    def delta_state(self) -> dict[str, torch.Tensor]:
        """This rank's unsynced part of the ledger (what a mid-epoch checkpoint keeps a rank)."""
        return {key: value.detach().cpu().clone() for key, value in self._delta_buffers().items()}

    @torch.no_grad()
    def load_delta(self, state: dict[str, torch.Tensor]) -> None:
        """Put back a :meth:`delta_state` (the same rank of the same world)."""
        for key, buffer in self._delta_buffers().items():
            buffer.copy_(self._delta_entry(state, key))

    @torch.no_grad()
    def fold_deltas(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Fold the :meth:`delta_state` of every rank into the global ledger, as :meth:`sync`
        would have (resuming with another number of processes)."""
        keys = [key for key in self._delta_buffers() if key != "steps"]
        summed = {key: sum(self._delta_entry(state, key) for state in states) for key in keys}
        steps = []
        if self.kind == "sum_of_sums":
            steps = [float(self._delta_entry(state, "steps")) for state in states]
        self._fold(summed, steps)

    @torch.no_grad()
    def sync(self) -> None:
        """All-reduce (SUM) the deltas of every rank and fold them into the global ledger.

        A collective: every rank must call it at the same point. With no process group it just
        folds this process's delta in, which leaves what the logits use unchanged.
        """
        buffers = self._delta_buffers()
        flat = torch.cat([buffer.reshape(-1) for buffer in buffers.values()])
        dist.all_reduce_sum_(flat)
        summed = dict(zip(buffers, flat.split(self.num_classes), strict=True))
        steps = [float(self.steps_since_sync)] if self.kind == "sum_of_sums" else []
        if steps:
            # Every rank must have run the same steps since the last sync (else S differs).
            world, total = dist.world_size(), float(summed.pop("steps"))
            if total != steps[0] * world:
                raise RuntimeError(
                    f"GALA ledger sync: {steps[0]:.0f} steps on this rank but {total:.0f} over "
                    f"{world} ranks; every rank must run the same number of steps between syncs"
                )
            steps = steps * world
        self._fold(summed, steps)

    def _delta_buffers(self) -> dict[str, torch.Tensor]:
        buffers = {"theta": self.theta_delta, "phi": self.phi_delta}
        if self.kind == "sum_of_sums":
            buffers |= {"s_theta": self.s_theta_delta, "s_phi": self.s_phi_delta}
            buffers["steps"] = self.steps_since_sync.reshape(1)
        return buffers

    def _delta_entry(self, state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in state:
            have = ", ".join(sorted(state)) or "nothing"
            raise ValueError(
                f"GALA ledger delta has no {key!r} (it has {have}): it was saved by a run with "
                f"another loss.ledger than this one's {self.kind!r}"
            )
        return (
            state[key]
            .to(device=self.theta_delta.device, dtype=torch.float64)
            .reshape(self._delta_buffers()[key].shape)
        )

    @torch.no_grad()
    def _fold(self, summed: dict[str, torch.Tensor], steps: list[float]) -> None:
        """Add summed deltas to the global ledger and zero this rank's deltas.

        ``steps`` are the ranks' steps since the last sync (all equal); S gains ``n *
        theta_global`` before theta_global gains the summed delta.
        """
        if self.kind == "sum_of_sums":
            if len(set(steps)) > 1:
                raise ValueError(f"GALA ledger deltas of unequal step counts: {steps}")
            n = steps[0] if steps else 0.0
            self.s_theta_global += n * self.theta_global + summed["s_theta"]
            self.s_phi_global += n * self.phi_global + summed["s_phi"]
        self.theta_global += summed["theta"]
        self.phi_global += summed["phi"]
        for buffer in self._delta_buffers().values():
            buffer.zero_()


__all__ = ["KINDS", "GradientLedger"]
