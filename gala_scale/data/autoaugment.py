"""AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019), RandAugment (Cubuk et al., 2020)
and colour jitter for the torch loader, matching what the DALI loader runs.

The DALI loader runs DALI's own ``reduced_cifar10`` policy, ``rand_augment`` and
``color_twist``; here are the same operations, probabilities and magnitude ranges written with
PIL. AutoAugment: 25 sub-policies, 11 magnitude bins, translations up to ``150/331`` of the side
(the paper's 150 px on 331 px). RandAugment: 2 of 14 operations at magnitude 9 of 30,
translations up to ``100/224`` of the side. Rotations up to 30 degrees, shears 0.3; empty areas
are grey (128).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from gala_scale.data.presets import AUTOAUGMENT_MAX_TRANSLATE_REL

ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "color": ImageEnhance.Color,
    "sharpness": ImageEnhance.Sharpness,
}
MAGNITUDE_BINS = 11
FILL = (128, 128, 128)
RANDAUGMENT_N, RANDAUGMENT_M, RANDAUGMENT_BINS = 2, 9, 31
RANDAUGMENT_MAX_TRANSLATE_REL = 100 / 224
RANDAUGMENT_OPS = (
    "translate_x",
    "translate_y",
    "shear_x",
    "shear_y",
    "rotate",
    "brightness",
    "contrast",
    "color",
    "sharpness",
    "posterize",
    "solarize",
    "equalize",
    "auto_contrast",
    "identity",
)

# (operation, probability, magnitude bin) pairs; the published CIFAR-10 policy.
CIFAR10_POLICY = (
    (("invert", 0.1, None), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translate_x", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shear_y", 0.5, 8), ("translate_y", 0.7, 9)),
    (("auto_contrast", 0.5, None), ("equalize", 0.9, None)),
    (("shear_y", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, None), ("equalize", 0.5, None)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translate_x", 0.5, 8)),
    (("equalize", 0.3, None), ("auto_contrast", 0.4, None)),
    (("translate_y", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2),),
    (("equalize", 0.2, None), ("auto_contrast", 0.6, None)),
    (("equalize", 0.2, None), ("equalize", 0.6, None)),
    (("color", 0.9, 9), ("equalize", 0.6, None)),
    (("auto_contrast", 0.8, None), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("auto_contrast", 0.9, None)),
    (("translate_y", 0.9, 9), ("translate_y", 0.7, 9)),
    (("auto_contrast", 0.9, None), ("solarize", 0.8, 3)),
    (("equalize", 0.8, None), ("invert", 0.1, None)),
    (("translate_y", 0.7, 9), ("auto_contrast", 0.9, None)),
)


def _level(magnitude: int, low: float, high: float) -> float:
    return low + (high - low) * magnitude / (MAGNITUDE_BINS - 1)


def _affine(img: Image.Image, matrix: tuple[float, ...], resample=Image.Resampling.NEAREST):
    return img.transform(
        img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=FILL
    )


def _apply(img: Image.Image, name: str, magnitude: int | None, sign: float) -> Image.Image:
    """One operation of the CIFAR-10 policy as DALI's ``reduced_cifar10`` defines it.

    DALI's definitions, where they depart from other implementations: geometric operations
    interpolate linearly; translations reach ``translate_pixels(side)`` at the top bin; a
    positive shear_y maps input (x, y) to output (x, y + s*x) and a positive translation moves the
    content right or down; solarize inverts the pixels at or above ``25.6 * magnitude`` (the
    threshold rises with the magnitude); posterize keeps ``round(0.4 * magnitude)`` bits, at
    least one. tests/test_data.py compares every operation with DALI's on the same image.
    """
    if name in ("invert", "equalize", "auto_contrast"):
        return {
            "invert": ImageOps.invert,
            "equalize": ImageOps.equalize,
            "auto_contrast": ImageOps.autocontrast,
        }[name](img)
    if name in ENHANCERS:
        return ENHANCERS[name](img).enhance(_level(magnitude, 0.1, 1.9))
    bilinear = Image.Resampling.BILINEAR
    if name == "rotate":
        return img.rotate(sign * _level(magnitude, 0, 30), resample=bilinear, fillcolor=FILL)
    if name in ("translate_x", "translate_y"):
        side = img.width if name == "translate_x" else img.height
        shift = sign * _level(magnitude, 0, translate_pixels(side))
        if name == "translate_x":
            return _affine(img, (1, 0, -shift, 0, 1, 0), bilinear)
        return _affine(img, (1, 0, 0, 0, 1, -shift), bilinear)
    if name == "shear_y":
        return _affine(img, (1, 0, 0, -sign * _level(magnitude, 0, 0.3), 1, 0), bilinear)
    if name == "posterize":
        return ImageOps.posterize(img, max(1, round(_level(magnitude, 0, 4))))
    if name == "solarize":
        return ImageOps.solarize(img, round(_level(magnitude, 0, 256)))
    raise ValueError(f"unknown AutoAugment operation {name!r}")


def autoaugment_pil(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Apply one randomly chosen sub-policy of the CIFAR-10 policy to an RGB image."""
    for name, probability, magnitude in CIFAR10_POLICY[rng.integers(len(CIFAR10_POLICY))]:
        if rng.random() < probability:
            img = _apply(img, name, magnitude, 1.0 if rng.random() < 0.5 else -1.0)
    return img


def translate_pixels(side: int) -> int:
    """The DALI AutoAugment policy's absolute translate bound for ``side``-pixel images."""
    return round(AUTOAUGMENT_MAX_TRANSLATE_REL * side)


def randaugment_translate_pixels(side: int) -> int:
    return round(RANDAUGMENT_MAX_TRANSLATE_REL * side)


def _randaugment_op(img: Image.Image, name: str, level: float, sign: float) -> Image.Image:
    """One RandAugment operation at ``level`` in [0, 1] (magnitude / (bins - 1)), as DALI's
    ``rand_augment`` suite defines it: the geometric ones interpolate linearly, translations
    reach ``randaugment_translate_pixels(side)``, and signs run as in :func:`_apply`."""
    if name == "identity":
        return img
    if name in ENHANCERS:
        return ENHANCERS[name](img).enhance(1 + sign * 0.9 * level)
    bilinear = Image.Resampling.BILINEAR
    if name in ("translate_x", "translate_y"):
        side = img.width if name == "translate_x" else img.height
        shift = sign * level * randaugment_translate_pixels(side)
        if name == "translate_x":
            return _affine(img, (1, 0, -shift, 0, 1, 0), bilinear)
        return _affine(img, (1, 0, 0, 0, 1, -shift), bilinear)
    if name == "shear_x":
        return _affine(img, (1, -sign * 0.3 * level, 0, 0, 1, 0), bilinear)
    if name == "shear_y":
        return _affine(img, (1, 0, 0, -sign * 0.3 * level, 1, 0), bilinear)
    if name == "rotate":
        return img.rotate(sign * 30 * level, resample=bilinear, fillcolor=FILL)
    if name == "posterize":
        return ImageOps.posterize(img, round(8 - 4 * level))
    if name == "solarize":
        return ImageOps.solarize(img, round(256 - 256 * level))
    return _apply(img, name, None, sign)  # equalize, auto_contrast


def randaugment_pil(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """RandAugment: ``RANDAUGMENT_N`` operations drawn uniformly, at magnitude ``RANDAUGMENT_M``."""
    level = RANDAUGMENT_M / (RANDAUGMENT_BINS - 1)
    for index in rng.integers(len(RANDAUGMENT_OPS), size=RANDAUGMENT_N):
        sign = 1.0 if rng.random() < 0.5 else -1.0
        img = _randaugment_op(img, RANDAUGMENT_OPS[index], level, sign)
    return img


def color_jitter_pil(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation, each scaled by a factor in [1 - s, 1 + s]."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img
