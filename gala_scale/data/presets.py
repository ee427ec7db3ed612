"""Image presets: sizes, mean/std and the train/eval transforms, defined once.

Both loaders (DALI and the torch fallback) and the exported artifact read these. The train-time
augmentations of the two loaders differ in their random draws, never in kind. The eval transform
is deterministic and written out here in numpy + PIL (:func:`eval_array`), which the torch loader
runs as is and the DALI pipeline mirrors: measured agreement in docs/data.md.

This module imports neither torch nor DALI, so serving code can mirror it from the artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# AutoAugment's translate range relative to the image side (150 px on 331 px in the paper).
AUTOAUGMENT_MAX_TRANSLATE_REL = 150 / 331
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Preset:
    """Everything a loader or a server needs to turn an image into the model's input."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: int  # the model's input side, train and eval
    eval_resize: int | None  # shorter side before the eval centre crop; None = no resize
    pad: int  # train: zero padding before the random crop (cifar)
    random_resized_crop: bool  # train: random-resized-crop (imagenet) instead of pad + crop
    expected_side: int | None  # the stored images must be this size (cifar); None = any

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "cifar": Preset(
        "cifar",
        CIFAR_MEAN,
        CIFAR_STD,
        crop=32,
        eval_resize=None,
        pad=4,
        random_resized_crop=False,
        expected_side=32,
    ),
    "imagenet": Preset(
        "imagenet",
        IMAGENET_MEAN,
        IMAGENET_STD,
        crop=224,
        eval_resize=256,
        pad=0,
        random_resized_crop=True,
        expected_side=None,
    ),
}


@dataclass(frozen=True)
class Augment:
    """Optional train-time policies, applied after the crop in this order by both loaders."""

    autoaugment: bool = False  # AutoAugment, CIFAR-10 policy
    color_jitter: float = 0.0  # brightness, contrast, saturation factors in [1 - s, 1 + s]
    randaugment: bool = False  # RandAugment, 2 operations at magnitude 9 of 30

    def __post_init__(self) -> None:
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter}")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def with_overrides(
    base: Preset,
    input_size: int = 0,
    mean: tuple | list = (),
    std: tuple | list = (),
    crop_pct: float = 0.0,
) -> Preset:
    """``base`` with the config's ``data.input_size``, ``data.mean``, ``data.std`` and
    ``data.crop_pct`` where given (0 or empty = the preset's). The eval resize keeps the preset's
    crop fraction unless ``crop_pct`` names one (1.0: resize to the crop, nothing cut off)."""
    if (input_size or crop_pct) and base.expected_side is not None:
        raise ValueError(
            f"data.input_size / data.crop_pct: preset {base.name!r} takes {base.expected_side} px "
            "images as they are; use preset 'imagenet' (or a timm model's) to resize"
        )
    crop = input_size or base.crop
    fraction = crop_pct or (base.crop / base.eval_resize if base.eval_resize else 1.0)
    if not 0 < fraction <= 1:
        raise ValueError(f"data.crop_pct: must be in (0, 1], got {crop_pct}")
    eval_resize = base.eval_resize if not (input_size or crop_pct) else round(crop / fraction)
    return replace(
        base,
        mean=tuple(mean) if mean else base.mean,
        std=tuple(std) if std else base.std,
        crop=crop,
        eval_resize=eval_resize,
    )


def check_image_fits(preset: Preset, width: int, height: int, where: str) -> None:
    """Raise ValueError when the stored images cannot be what ``preset`` expects."""
    side = preset.expected_side
    if side is not None and (width, height) != (side, side):
        raise ValueError(
            f"preset {preset.name!r} expects {side}x{side} images, but {where} is "
            f"{width}x{height}; use preset 'imagenet' for larger images"
        )
    if side is None and min(width, height) < 8:
        raise ValueError(f"{where} is {width}x{height}: too small for preset {preset.name!r}")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bilinear, antialiased), keeping the aspect."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.BILINEAR)


def centre_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    # Halves round up, as DALI's centred crop does.
    top, left = (h - size + 1) // 2, (w - size + 1) // 2
    return arr[top : top + size, left : left + size]


def normalise(arr: np.ndarray, preset: Preset) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, (x / 255 - mean) / std."""
    mean = np.asarray(preset.mean, dtype=np.float32) * 255
    std = np.asarray(preset.std, dtype=np.float32) * 255
    return ((arr.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def eval_array(img: Image.Image, preset: Preset) -> np.ndarray:
    """The eval transform: (resize shorter side, centre crop,) normalise -> 3xHxW float32."""
    img = img.convert("RGB")
    if preset.eval_resize is not None:
        img = resize_shorter(img, preset.eval_resize)
    arr = np.asarray(img)
    if arr.shape[0] != preset.crop or arr.shape[1] != preset.crop:
        arr = centre_crop(arr, preset.crop)
    return normalise(arr, preset)
