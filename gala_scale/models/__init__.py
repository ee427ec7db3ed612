"""Models, registered by name: ``create_model("resnet32", num_classes=100)``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from gala_scale.models.resnet import resnet50, resnet152, resnext50_32x4d
from gala_scale.models.resnet_cifar import CifarResNet
from gala_scale.models.tiny import TinyNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "tiny": TinyNet,
    "tiny_bn": partial(TinyNet, batch_norm=True),
    "resnet20": partial(CifarResNet, depth=20),
    "resnet32": partial(CifarResNet, depth=32),
    "resnet50": resnet50,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,
}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "create_model"]
