"""Checks every loss's test makes the same way."""

import torch


def assert_gradients_flow(loss, logits: torch.Tensor, *targets: torch.Tensor) -> None:
    """The loss of ``logits`` under each of ``targets`` has finite, non-zero gradients."""
    for target in targets:
        x = logits.float().requires_grad_()
        loss(x, target).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def cosine_batch(num_classes: int, seed: int = 0, rows: int = 12):
    """Seeded float64 logits in [-1, 1] (cosines), hard labels and soft target rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.rand(rows, num_classes, generator=gen, dtype=torch.float64) * 2 - 1
    hard = torch.randint(0, num_classes, (rows,), generator=gen)
    soft = torch.softmax(torch.randn(rows, num_classes, generator=gen, dtype=torch.float64), 1)
    return logits, hard, soft
