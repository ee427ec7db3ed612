"""Benchmark: training-step time of GALA vs CE, and the ledger update vs a Python loop.

    python -m gala_scale.bench loss [--repeats 30]

Two workloads, each timed side by side in one run: a ResNet-32 on 32x32 inputs with K=100
(batch 128) and a linear head with K=8,142 over 2,048 features (batch 256, the iNaturalist 2018
shape). The ledger update is the vectorised closed form against a per-sample Python loop doing
the same accumulation. Goals: GALA step <= 1.03x CE, ledger update >= 100x the loop.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gala_scale.bench.common import interleaved_medians, machine
from gala_scale.losses import GALALoss, create_loss
from gala_scale.models import create_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per candidate")
    parser.add_argument("--loop-repeats", type=int, default=5, help="rounds for the Python loop")


def _train_step(
    model: nn.Module, criterion: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(inputs), labels).backward()
        optimizer.step()

    return step


def _gala_vs_ce(model_fn: Callable[[], nn.Module], inputs, labels, num_classes, repeats):
    # Both candidates start from identical weights; each trains its own copy.
    torch.manual_seed(0)
    model = model_fn()
    steps = {
        "ce": _train_step(model, create_loss("ce"), inputs, labels),
        # As the trainer builds it: its guard checks the loss every log_every steps, not a step.
        "gala": _train_step(
            copy.deepcopy(model), GALALoss(num_classes, check_finite=False).train(), inputs, labels
        ),
        # The authors' accumulation (loss.ledger: sum_of_sums): S beside theta and phi.
        "gala_sos": _train_step(
            copy.deepcopy(model),
            GALALoss(num_classes, check_finite=False, ledger="sum_of_sums").train(),
            inputs,
            labels,
        ),
    }
    medians = interleaved_medians(steps, repeats)
    return {
        "ce_step_s": medians["ce"],
        "gala_step_s": medians["gala"],
        "gala_over_ce": medians["gala"] / medians["ce"],
        "gala_sos_step_s": medians["gala_sos"],
        "gala_sos_over_ce": medians["gala_sos"] / medians["ce"],
    }


def python_loop_update(
    theta: torch.Tensor, phi: torch.Tensor, log_p: torch.Tensor, labels: torch.Tensor
) -> None:
    """The per-sample loop the vectorised update replaces (what a naive trainer writes)."""
    probs = log_p.exp()
    for i in range(labels.shape[0]):
        k = int(labels[i])
        grad = probs[i].clone()
        grad[k] -= 1.0
        theta[k] += grad[k].abs().double()
        phi[k] += (grad.abs().sum() - grad[k].abs()).double()


def _ledger_update(num_classes: int, batch: int, repeats: int, loop_repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    log_p = F.log_softmax(torch.randn(batch, num_classes, generator=gen), dim=1)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    loss = GALALoss(num_classes).train()
    theta = torch.zeros(num_classes, dtype=torch.float64)
    phi = torch.zeros(num_classes, dtype=torch.float64)
    vectorised = interleaved_medians({"v": lambda: loss._accumulate(log_p, labels)}, repeats)
    loop = interleaved_medians(
        {"l": lambda: python_loop_update(theta, phi, log_p, labels)}, loop_repeats, warmup=1
    )
    # Both accumulated the same increments the same number of times per call: compare per call.
    runs_v, runs_l = repeats + 2, loop_repeats + 1
    # The loop sums in float32 per sample, the closed form per batch: agree to float32 rounding.
    torch.testing.assert_close(loss.theta / runs_v, theta / runs_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.phi / runs_v, phi / runs_l, rtol=1e-5, atol=1e-6)
    return {
        "ledger_vectorised_s": vectorised["v"],
        "ledger_loop_s": loop["l"],
        "ledger_speedup": loop["l"] / vectorised["v"],
    }


def run(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    cifar = _gala_vs_ce(
        lambda: create_model("resnet32", num_classes=100),
        torch.randn(128, 3, 32, 32, generator=gen),
        torch.randint(0, 100, (128,), generator=gen),
        100,
        args.repeats,
    )
    print(f"resnet32 K=100 batch 128: {cifar}", flush=True)
    head = _gala_vs_ce(
        lambda: nn.Linear(2048, 8142),
        torch.randn(256, 2048, generator=gen),
        torch.randint(0, 8142, (256,), generator=gen),
        8142,
        args.repeats,
    )
    print(f"linear head K=8142 batch 256: {head}", flush=True)
    ledger = _ledger_update(8142, 256, args.repeats, args.loop_repeats)
    print(f"ledger update K=8142 batch 256: {ledger}", flush=True)
    return {
        "benchmark": "loss",
        "machine": machine(),
        "resnet32_k100": cifar,
        "linear_k8142": head,
        "ledger_k8142_b256": ledger,
        "goals_met": {
            "gala_step_le_1.03x_ce": max(
                row[key] for row in (cifar, head) for key in ("gala_over_ce", "gala_sos_over_ce")
            )
            <= 1.03,
            "ledger_ge_100x_loop": ledger["ledger_speedup"] >= 100,
        },
    }
