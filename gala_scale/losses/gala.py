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

Two ledgers, both float64 (``ledger=``): ``"sum"`` (default), where the logits take theta and phi,
and ``"sum_of_sums"``, where they take the running sums of those running sums, what the authors'
``collect_grad`` feeds the classifier. The ledger and its distributed algebra (global + delta,
the all-reduce at sync points, checkpoint state) are :class:`~gala_scale.losses.ledger.
GradientLedger`; this module computes the increments it receives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gala_scale.losses.ledger import KINDS, GradientLedger
from gala_scale.losses.registry import Loss, LossSpec, Option

VARIANTS = ("reference", "paper")
LEDGER_INITS = ("zeros", "counts")


class GALALoss(Loss):
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
        self.num_classes = num_classes
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.eps = float(eps)
        self.variant = variant
        # The finiteness check of the loss is a device-to-host sync point, one per step.
        self.check_finite = check_finite
        self.ledger = GradientLedger(num_classes, ledger)
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
        self.ledger.seed(seed)

    @property
    def theta(self) -> torch.Tensor:
        """The ledger's effective theta (a shorthand of ``self.ledger.theta``)."""
        return self.ledger.theta

    @property
    def phi(self) -> torch.Tensor:
        """The ledger's effective phi (a shorthand of ``self.ledger.phi``)."""
        return self.ledger.phi

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the ledger was a submodule keep its buffers at the top.
        for name in list(state_dict):
            local = name[len(prefix) :]
            if name.startswith(prefix) and "." not in local and local in self.ledger._buffers:
                state_dict[f"{prefix}ledger.{local}"] = state_dict.pop(name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"eps={self.eps}, variant={self.variant!r}, ledger={self.ledger.kind!r}, "
            f"ledger_init={self.ledger_init!r}"
        )

    def adjusted_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The adjusted logits z' for ``logits`` and ``targets`` under the current ledger."""
        log_theta = torch.log(self.ledger.logit_theta + self.eps).to(logits.dtype)
        log_phi = torch.log(self.ledger.logit_phi + self.eps).to(logits.dtype)
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
            self.ledger.end_step()
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
        log_theta = self.ledger.logit_theta.add_(self.eps).log_()  # a fresh sum: in place is safe
        shift = (self.lambda1 * log_theta).to(dtype)
        if self.variant == "reference":
            return shift, None
        on_target = self.lambda2 * torch.log(self.ledger.logit_phi[targets] + self.eps)
        return shift, (on_target - self.lambda1 * log_theta[targets]).to(dtype)

    def _soft_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The adjusted logits of soft targets (the reference variant's up to a row constant)."""
        if self.variant == "paper":
            return self.adjusted_logits(logits, targets)
        log_theta = torch.log(self.ledger.logit_theta + self.eps)
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
        self.ledger.add(pos, neg)

    @torch.no_grad()
    def _add_hard(self, nll: torch.Tensor, targets: torch.Tensor) -> None:
        """The ledger increment of hard labels from each sample's ``-log p'_y``.

        g = p' - onehot(y): the positive part is 1 - p'_y and the negative part, sum over
        j != y of p'_j, is the same number, so the target's probability is all that is needed.
        ``-expm1(-nll)`` is 1 - p'_y without the cancellation of ``1 - exp(log p'_y)``.
        """
        self.ledger.add_per_sample(nll.double().neg_().expm1_().neg_(), targets)

    def _check_inputs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (batch, {self.num_classes}), got {tuple(logits.shape)}"
            )
        if logits.device != self.ledger.theta_global.device:
            raise ValueError(
                f"logits are on {logits.device} but the GALA ledger is on "
                f"{self.ledger.theta_global.device}; move the loss with .to(device)"
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


SPECS = [
    LossSpec(
        "gala",
        "gradient-aware logit adjustment (Zhang et al.): logits adjusted by the ledger",
        GALALoss,
        options={
            "lambda1": Option(1.2, "weight of log(theta + eps)"),
            "lambda2": Option(0.9, "weight of log(phi + eps)"),
            "eps": Option(1e-3, "epsilon inside the logs", gt=0.0),
            "variant": Option(
                "reference",
                "reference (the authors' logit adjustment) or paper (eq. 6)",
                choices=VARIANTS,
            ),
            "ledger_init": Option(
                "zeros",
                "zeros, or counts (theta = phi = scale x (1 - 1/K) x training count)",
                choices=LEDGER_INITS,
            ),
            "ledger_init_scale": Option(
                1.0, "ledger_init counts: epochs' worth of increments", gt=0.0
            ),
            "ledger": Option(
                "sum",
                "what the logits take: sum (theta, phi: the running sums) or sum_of_sums (their "
                "running sums, S_t = S_(t-1) + theta_t a step: the authors' code)",
                choices=KINDS,
            ),
        },
        needs=("num_classes", "class_counts"),
        ledger=True,
    )
]
