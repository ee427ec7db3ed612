"""timm backbones by name (``model.name: timm/<architecture>``), built without weights.

timm builds the architecture with a K-class head and never downloads anything here: pretrained
weights come from a local file (``model.pretrained``, gala_scale.models.pretrained). The input
preset of a timm model follows its pretrained config (mean, std, input size, centre-crop
fraction) unless the run's config names another (:func:`input_preset`).
"""

from __future__ import annotations

import difflib

from torch import nn

from gala_scale.data.presets import Preset

PREFIX = "timm/"


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def architecture(name: str) -> str:
    """``timm/<architecture>`` -> ``<architecture>``, checked against timm's registry."""
    import timm

    arch = name.removeprefix(PREFIX)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(f"model.name: {name!r}: timm has no architecture {arch!r}{hint}")
    return arch


def create_timm(name: str, num_classes: int, bn_eps: float = 0.0) -> nn.Module:
    """The architecture with a ``num_classes`` head; ``bn_eps`` > 0 sets its BatchNorm epsilon
    (weights trained in TensorFlow, EfficientNet-Lite's among them, want 1e-3)."""
    import timm

    extra = {"bn_eps": bn_eps} if bn_eps else {}
    try:
        return timm.create_model(
            architecture(name), pretrained=False, num_classes=num_classes, **extra
        )
    except TypeError as err:
        raise ValueError(
            f"model.bn_eps: {name!r} does not take a BatchNorm epsilon ({err})"
        ) from None


def input_preset(name: str) -> Preset:
    """The preset of a timm model's pretrained config: its mean and std, its input side as the
    crop, the eval resize from its centre-crop fraction, random-resized-crop for training."""
    import timm

    config = timm.create_model(architecture(name), pretrained=False).pretrained_cfg
    side = int(config.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(config.get("crop_pct", 0.875))
    return Preset(
        name,
        tuple(float(v) for v in config.get("mean", (0.485, 0.456, 0.406))),
        tuple(float(v) for v in config.get("std", (0.229, 0.224, 0.225))),
        crop=side,
        eval_resize=round(side / crop_pct),
        pad=0,
        random_resized_crop=True,
        expected_side=None,
    )
