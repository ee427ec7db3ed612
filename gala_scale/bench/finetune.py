"""Benchmark: a training step of each fine-tuning policy, and of stage 2 on cached features.

    python -m gala_scale.bench finetune [--model timm/efficientnet_lite0] [--image-size 64]
        [--batch-size 64] [--classes 10] [--repeats 10]

Side by side in one run, interleaved rounds, medians: the trainer's step (forward, GALA loss,
backward, AdamW) with ``model.finetune`` ``full``, ``last_k`` (``--trainable-blocks``) and
``linear``, and the stage-2 step on the same batch's cached features (the classifier alone).
Reports images/s of each, and ``stage2_over_linear``: how many times faster an epoch on cached
features is than the same classifier trained through the frozen backbone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from gala_scale.bench.common import interleaved_medians, machine
from gala_scale.losses import GALALoss
from gala_scale.models import create_model
from gala_scale.models.finetune import apply_policy, param_groups
from gala_scale.models.pretrained import head_module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="timm/efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--trainable-blocks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per candidate")


def _step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, k: int) -> Callable:
    groups = param_groups(model, 1e-3, 0.05, 1.0, 1.0)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, foreach=True)
    loss = GALALoss(k, check_finite=False).train()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model(inputs), labels).backward()
        optimizer.step()

    return step


def run(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    side, batch = args.image_size, args.batch_size
    inputs = torch.randn(batch, 3, side, side, generator=gen)
    labels = torch.arange(batch) % args.classes
    steps = {}
    for policy in ("full", "last_k", "linear"):
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=args.classes)
        apply_policy(model, policy, args.trainable_blocks)
        steps[policy] = _step(model, inputs, labels, args.classes)
    # Stage 2: the same classifier on the batch's features, computed once beforehand.
    head = head_module(model)
    seen = []
    hook = head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model.eval()(inputs)
    hook.remove()
    features = seen[0].flatten(1).half().float()  # as the cache stores them
    head2 = nn.Linear(features.shape[1], args.classes)
    steps["stage2"] = _step(head2, features, labels, args.classes)
    medians = interleaved_medians(steps, args.repeats)
    per_s = {name: batch / seconds for name, seconds in medians.items()}
    print(f"{args.model} {side} px batch {batch}: {per_s}", flush=True)
    return {
        "benchmark": "finetune",
        "machine": machine(),
        "model": args.model,
        "image_size": side,
        "batch": batch,
        "trainable_blocks": args.trainable_blocks,
        "step_s": medians,
        "images_per_s": per_s,
        "stage2_over_linear": medians["linear"] / medians["stage2"],
    }
