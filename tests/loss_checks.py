"""Checks every loss's test makes the same way."""

import torch


def assert_gradients_flow(loss, logits: torch.Tensor, *targets: torch.Tensor) -> None:
    """The loss of ``logits`` under each of ``targets`` has finite, non-zero gradients."""
    for target in targets:
        x = logits.float().requires_grad_()
        loss(x, target).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
