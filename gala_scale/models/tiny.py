"""A tiny CNN for debug runs and distributed-equivalence checks.

Without BatchNorm (``tiny``), a step of N processes with batches b_1..b_N equals one process's
step on their concatenation, which the tests use to compare multi-process runs with one process.
``tiny_bn`` adds a BatchNorm after each convolution, for the code paths that only BatchNorm
takes (bf16 with fp32 running statistics, SyncBatchNorm) in seconds instead of a ResNet's minutes.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16, batch_norm: bool = False) -> None:
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=not batch_norm),
            norm(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=not batch_norm),
            norm(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
