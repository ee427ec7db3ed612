"""The Gradient-Aware Logit Adjustment (GALA) loss and its per-class gradient ledger.

Spec: docs/losses.md, "GALA". For a sample of class k with raw logits z, eq. 6 of the paper is

    z'_j = z_j + lambda1 * log(theta_j + eps) - lambda2 * log(phi_k + eps)    (j != k)
    z'_k = z_k

and the loss is the cross-entropy of z'. ``theta_j`` is the accumulated positive gradient of
class j (sum of |dL/dz'_j| over samples of class j) and ``phi_k`` the accumulated negative
gradient produced by samples of class k (sum over j != k of |dL/dz'_j|), both summed over the
whole run, never reset.

Two variants, both exact:

* ``variant="paper"``: eq. 6 as written above.
* ``variant="reference"`` (default): the authors' code's logit adjustment. The lambda1 term is
  added to every logit, the target's included, and the lambda2 term is subtracted from the whole
  row, where it cancels in the softmax. Their published numbers come from it with
  ``ledger="sum_of_sums"`` (below).

With hard labels theta and phi receive equal increments (both ``1 - p'_k``), so the two variants
coincide when lambda1 == lambda2. With the published lambda1 = 1.2, lambda2 = 0.9, eq. 6 leaves
the target logit unadjusted while the others move by (lambda1 - lambda2) * log(ledger scale): a
margin in favour of the non-target classes that grows with the ledger; ``python -m
gala_scale.reproduce --losses gala_paper,gala_reference`` measures what that does to accuracy.

Soft targets t (rows of a probability matrix, e.g. mixup or label smoothing) are supported. A
sample counts as class k with weight t_k: it adds ``t_k * |g_k|`` to theta_k and
``t_k * sum_{j != k} |g_j|`` to phi_k, where g = softmax(z') - t. In the paper variant the
target-dependent offset is scaled by (1 - t_j), which is eq. 6 for one-hot t; the lambda2 term
uses the target-weighted mean of log(phi + eps).

Two ledgers, both float64 (``ledger=``):

* ``"sum"`` (default): the logits take theta and phi, the running sums above.
* ``"sum_of_sums"``: the logits take ``S_theta`` and ``S_phi``, the running sums of those running
  sums, ``S_t = S_(t-1) + theta_t`` at every training call, so ``S_T = sum_t (T - t + 1) *
  increment_t``: what the authors' ``collect_grad`` feeds the classifier (their (K, K) matrix of
  accumulated |dL/dz| is added, whole, to the positive and negative matrices at every step).
  Early increments weigh T times more than the last. Kept as per-class vectors, never (K, K).

Distributed: the ledger is ``global + delta``. ``global`` is what all ranks agreed on at the last
:meth:`GALALoss.sync`; ``delta`` is what this rank accumulated since. The logits use both.
``sync`` all-reduces the deltas (SUM) and folds them into ``global``, so every rank ends with the
ledger one process would have accumulated from the same samples. Call it at the same points on
every rank and before any checkpoint. With ``sum_of_sums`` one global step adds the global theta
to S, so each rank also keeps ``E``, the running sum of its own theta delta, and counts its steps
n since the sync: then ``S = S_global + n * theta_global + E`` on each rank, and the sync folds
``n * theta_global + sum_r E_r`` into ``S_global`` (derivation: docs/losses.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gala_scale import dist

VARIANTS = ("reference", "paper")
LEDGER_INITS = ("zeros", "counts")
LEDGERS = ("sum", "sum_of_sums")
# Buffers of the sum_of_sums ledger: S = S_global + steps * theta_global + S_delta.
SUM_BUFFERS = ("s_theta_global", "s_phi_global", "s_theta_delta", "s_phi_delta")


class GALALoss(nn.Module):
    """Cross-entropy over gradient-aware adjusted logits; ``loss(logits, targets)`` -> mean loss.

    ``targets`` is either a ``(B,)`` integer tensor of class indices or a ``(B, K)`` float tensor
    of target probabilities. In training mode every call adds the closed-form gradients of that
    call to this rank's ledger delta; in eval mode the ledger is left alone.
    """

    def __init__(
        self,
        num_classes: int,
        lambda1: float = 1.2,
        lambda2: float = 0.9,
        eps: float = 1e-3,
        variant: str = "reference",
        check_finite: bool = True,
        ledger_init: str = "zeros",
        class_counts: list[int] | None = None,
        ledger_init_scale: float = 1.0,
        ledger: str = "sum",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown GALA variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if ledger not in LEDGERS:
            raise ValueError(f"unknown GALA ledger {ledger!r}; valid: {', '.join(LEDGERS)}")
        self.ledger = ledger
        self.num_classes = num_classes
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.eps = float(eps)
        self.variant = variant
        # The finiteness check of the loss is a device-to-host sync point, one per step.
        self.check_finite = check_finite
        for name in ("theta_global", "phi_global", "theta_delta", "phi_delta"):
            self.register_buffer(name, torch.zeros(num_classes, dtype=torch.float64))
        if ledger == "sum_of_sums":
            for name in SUM_BUFFERS:
                self.register_buffer(name, torch.zeros(num_classes, dtype=torch.float64))
            # Training calls since the last sync: equal on every rank (float64 for the products).
            self.register_buffer("steps_since_sync", torch.zeros((), dtype=torch.float64))
        self.ledger_init = ledger_init
        self._init_ledger(ledger_init, class_counts, ledger_init_scale)

    def _init_ledger(self, how: str, counts: list[int] | None, scale: float) -> None:
        """Seed theta and phi before training (``how="counts"``), or leave them at zero.

        With hard labels every sample of class k adds ``1 - p'_k`` to both theta_k and phi_k, and
        at the start of training ``p'_k`` is near 1/K. So ``scale`` epochs of increments at those
        first predictions leave ``theta_k = phi_k = scale * (1 - 1/K) * n_k``: the seed is that
        ledger, what the run would have accumulated if the model had stayed at its start. The
        reference variant then begins as logit adjustment with ``tau = lambda1`` (the lambda2
        term is a row constant) instead of plain cross-entropy, and its own increments take over
        as the run goes on. The seed is part of the global ledger, so every rank starts from it.
        With ``sum_of_sums`` S starts at the seed too (one step of it): the first step is the same
        logit adjustment, and S then grows by at least the seed a step, which in log space is a
        constant per row, so the prior from the counts stays.
        """
        if how not in LEDGER_INITS:
            raise ValueError(f"unknown ledger_init {how!r}; valid: {', '.join(LEDGER_INITS)}")
        if how == "zeros":
            return
        if counts is None or len(counts) != self.num_classes:
            got = "none" if counts is None else f"{len(counts)} counts"
            raise ValueError(
                f"ledger_init 'counts' needs {self.num_classes} class counts, got {got}"
            )
        if scale <= 0 or any(n < 0 for n in counts):
            raise ValueError(f"ledger_init needs scale > 0 and counts >= 0, got {scale}, {counts}")
        seed = scale * (1.0 - 1.0 / self.num_classes) * torch.tensor(counts, dtype=torch.float64)
        seeded = ["theta_global", "phi_global"]
        if self.ledger == "sum_of_sums":
            seeded += ["s_theta_global", "s_phi_global"]
        for name in seeded:
            getattr(self, name).copy_(seed)

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
        if self.ledger == "sum":
            return self.theta
        return self.s_theta_global + self.steps_since_sync * self.theta_global + self.s_theta_delta

    @property
    def logit_phi(self) -> torch.Tensor:
        """What the logits take for phi: phi itself, or S_phi with ``sum_of_sums``."""
        if self.ledger == "sum":
            return self.phi
        return self.s_phi_global + self.steps_since_sync * self.phi_global + self.s_phi_delta

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"eps={self.eps}, variant={self.variant!r}, ledger={self.ledger!r}, "
            f"ledger_init={self.ledger_init!r}"
        )

    def adjusted_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The adjusted logits z' for ``logits`` and ``targets`` under the current ledger."""
        log_theta = torch.log(self.logit_theta + self.eps).to(logits.dtype)
        log_phi = torch.log(self.logit_phi + self.eps).to(logits.dtype)
        hard = targets.dim() == 1
        # lambda2 * log(phi_k + eps) for each row's target class k (weighted mean if soft).
        row_term = log_phi[targets] if hard else targets @ log_phi
        offset = self.lambda1 * log_theta.unsqueeze(0) - self.lambda2 * row_term.unsqueeze(1)
        if self.variant == "reference":
            return logits + offset
        if hard:
            # eq. 6: the target logit stays as it is.
            return logits + offset.scatter(1, targets.unsqueeze(1), 0.0)
        return logits + (1.0 - targets) * offset

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = self._check_inputs(logits, targets)
        # Losses are computed in float32 even when the model runs in bf16.
        logits = logits.float()
        if targets.dim() == 1:
            # Per-sample -log p'_y: its mean is the loss and it alone gives the ledger increment.
            nll = _ShiftedNLL.apply(logits, *self._shifts(targets, logits.dtype), targets)
            loss = nll.mean()
        else:
            log_p = F.log_softmax(self._soft_logits(logits, targets), dim=1)
            loss = -(targets * log_p).sum(dim=1).mean()
        # NaN or +inf in any logit of a row makes the loss non-finite; checking the scalar costs
        # one device-to-host sync per step but no extra pass over the (batch, K) logits.
        if self.check_finite and not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                "GALA loss is not finite: the logits hold NaN or inf. The ledger was not updated; "
                "lower the learning rate or check the inputs."
            )
        if self.training and targets.dim() == 1:
            self._add_hard(nll.detach(), targets)
        elif self.training:
            self._accumulate(log_p.detach(), targets)
        if self.training:
            self._add_step()
        return loss

    def _shifts(
        self, targets: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What hard-label logits need added to equal :meth:`adjusted_logits` up to a constant
        per row: a (K,) shift of every row, and a (B,) extra shift of each row's target logit.

        A per-row constant cancels in the softmax, so the loss and its gradient are those of the
        adjusted logits. The reference variant drops its lambda2 row term (no target shift); eq.
        6 adds lambda2 * log(phi_k + eps) to its whole row, which leaves ``z_j + lambda1 *
        log(theta_j + eps)`` off the target and ``z_k + lambda2 * log(phi_k + eps)`` on it.
        """
        log_theta = self.logit_theta.add_(self.eps).log_()  # a fresh sum: in place is safe
        shift = (self.lambda1 * log_theta).to(dtype)
        if self.variant == "reference":
            return shift, None
        on_target = self.lambda2 * torch.log(self.logit_phi[targets] + self.eps)
        return shift, (on_target - self.lambda1 * log_theta[targets]).to(dtype)

    def _soft_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The adjusted logits of soft targets (the reference variant's up to a row constant)."""
        if self.variant == "paper":
            return self.adjusted_logits(logits, targets)
        log_theta = torch.log(self.logit_theta + self.eps)
        return logits + (self.lambda1 * log_theta).to(logits.dtype)

    @torch.no_grad()
    def _accumulate(self, log_p: torch.Tensor, targets: torch.Tensor) -> None:
        """Add this call's |dL/dz'| to the ledger delta, vectorised over samples and classes."""
        if targets.dim() == 1:
            self._add_hard(-log_p.gather(1, targets.unsqueeze(1)).squeeze(1), targets)
            return
        grad_abs = (log_p.exp() - targets).abs()
        weights = targets.to(grad_abs.dtype)
        pos = (weights * grad_abs).sum(dim=0)
        neg = (weights * (grad_abs.sum(dim=1, keepdim=True) - grad_abs)).sum(dim=0)
        self.theta_delta += pos.double()
        self.phi_delta += neg.double()

    @torch.no_grad()
    def _add_hard(self, nll: torch.Tensor, targets: torch.Tensor) -> None:
        """The ledger increment of hard labels from each sample's ``-log p'_y``.

        g = p' - onehot(y): the positive part is 1 - p'_y and the negative part, sum over
        j != y of p'_j, is the same number, so the target's probability is all that is needed.
        ``-expm1(-nll)`` is 1 - p'_y without the cancellation of ``1 - exp(log p'_y)``.
        """
        pos = nll.double().neg_().expm1_().neg_()
        self.theta_delta.index_add_(0, targets, pos)
        self.phi_delta.index_add_(0, targets, pos)

    @torch.no_grad()
    def _add_step(self) -> None:
        """With ``sum_of_sums``, one step of S: S grows by this step's theta (and phi), which on
        this rank is ``n * theta_global`` (added at the sync) plus the local delta, summed into E.
        """
        if self.ledger == "sum":
            return
        self.s_theta_delta += self.theta_delta
        self.s_phi_delta += self.phi_delta
        self.steps_since_sync += 1

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
        if self.ledger == "sum_of_sums":
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
        steps = [float(self.steps_since_sync)] if self.ledger == "sum_of_sums" else []
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
        if self.ledger == "sum_of_sums":
            buffers |= {"s_theta": self.s_theta_delta, "s_phi": self.s_phi_delta}
            buffers["steps"] = self.steps_since_sync.reshape(1)
        return buffers

    def _delta_entry(self, state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in state:
            have = ", ".join(sorted(state)) or "nothing"
            raise ValueError(
                f"GALA ledger delta has no {key!r} (it has {have}): it was saved by a run with "
                f"another loss.ledger than this one's {self.ledger!r}"
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
        if self.ledger == "sum_of_sums":
            if len(set(steps)) > 1:
                raise ValueError(f"GALA ledger deltas of unequal step counts: {steps}")
            n = steps[0] if steps else 0.0
            self.s_theta_global += n * self.theta_global + summed["s_theta"]
            self.s_phi_global += n * self.phi_global + summed["s_phi"]
        self.theta_global += summed["theta"]
        self.phi_global += summed["phi"]
        for buffer in self._delta_buffers().values():
            buffer.zero_()

    def _check_inputs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (batch, {self.num_classes}), got {tuple(logits.shape)}"
            )
        if logits.device != self.theta_global.device:
            raise ValueError(
                f"logits are on {logits.device} but the GALA ledger is on "
                f"{self.theta_global.device}; move the loss with .to(device)"
            )
        if targets.dim() == 1:
            if targets.shape[0] != logits.shape[0] or targets.is_floating_point():
                raise ValueError(
                    f"hard targets must be an integer tensor of shape ({logits.shape[0]},), "
                    f"got {targets.dtype} {tuple(targets.shape)}"
                )
        elif targets.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        else:
            targets = targets.to(torch.float32)
        return targets


class _ShiftedNLL(torch.autograd.Function):
    """Per-sample ``-log softmax(z + shift)_y`` (``shift`` (K,) on every row, ``target_shift``
    (B,) on each row's target logit, neither differentiated) and its gradient in z.

    ``F.cross_entropy(z + shift)`` makes a (B, K) sum, a (B, K) log-softmax, and two (B, K)
    tensors more in the backward pass; at K = 8,142 those allocations cost more than the
    arithmetic. Here the sum is made once and turned in place into the probabilities, which the
    backward pass reuses: gradient ``(p - onehot(y)) * grad``.
    """

    @staticmethod
    def forward(ctx, logits, shift, target_shift, targets):
        col = targets.unsqueeze(1)
        p = logits + shift
        if target_shift is not None:
            p.scatter_add_(1, col, target_shift.unsqueeze(1))
        p.sub_(p.amax(1, keepdim=True))  # the largest exponent is 0: no overflow
        target = p.gather(1, col).squeeze(1)
        total = p.exp_().sum(1)
        p.div_(total.unsqueeze(1))
        ctx.save_for_backward(p, col)
        return total.log_().sub_(target)

    @staticmethod
    def backward(ctx, grad):
        p, col = ctx.saved_tensors
        grad = grad.unsqueeze(1)
        out = p * grad
        return out.scatter_add_(1, col, -grad), None, None, None
