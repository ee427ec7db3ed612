"""Models, registered by name: ``create_model("resnet32", num_classes=100)``, and any timm
architecture as ``create_model("timm/efficientnet_lite0", num_classes=100)``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from gala_scale.data.presets import Preset, get_preset, with_overrides
from gala_scale.models.resnet_cifar import CifarResNet
from gala_scale.models.timm_models import architecture, create_timm, input_preset, is_timm
from gala_scale.models.tiny import TinyNet


def _torchvision(name: str) -> Callable[..., nn.Module]:
    """torchvision's ``name``, with each block's last BatchNorm at zero (every residual branch
    starts as the identity; the ImageNet recipes' choice) and no weights: a file gives them.
    torchvision is imported on the first build (it pulls torch._dynamo: a second a process)."""

    def build(num_classes: int, **kwargs) -> nn.Module:
        import torchvision

        builder = getattr(torchvision.models, name)
        return builder(num_classes=num_classes, zero_init_residual=True, **kwargs)

    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "tiny": TinyNet,
    "tiny_bn": partial(TinyNet, batch_norm=True),
    "resnet20": partial(CifarResNet, depth=20),
    "resnet32": partial(CifarResNet, depth=32),
    "resnet50": _torchvision("resnet50"),
    "resnet152": _torchvision("resnet152"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d"),
}


def check_name(name: str) -> None:
    """Raise ValueError naming ``name`` unless it is a registered model or a timm architecture
    (checked without building anything)."""
    if is_timm(name):
        architecture(name)
    elif name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}, or timm/<architecture>"
        )


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    check_name(name)
    if is_timm(name):
        return create_timm(name, num_classes, **kwargs)
    return MODELS[name](num_classes=num_classes, **kwargs)


def model_options(cfg) -> dict:
    """Keyword arguments of ``create_model`` from a run's config: ``model.bn_eps`` for timm."""
    return {"bn_eps": cfg.model.bn_eps} if cfg.model.bn_eps else {}


def run_preset(data, model_name: str) -> Preset:
    """The input preset of a run: ``data.preset`` (``auto``: a timm model's pretrained config,
    else ``cifar``) with the config's overrides (``data`` is the run's DataConfig)."""
    if data.preset == "auto":
        base = input_preset(model_name) if is_timm(model_name) else get_preset("cifar")
    else:
        base = get_preset(data.preset)
    return with_overrides(base, data.input_size, data.mean, data.std, data.crop_pct)


__all__ = ["MODELS", "check_name", "create_model", "model_options", "run_preset"]
