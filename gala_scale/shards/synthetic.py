"""A procedurally generated long-tailed image dataset: the embedded default.

Class k is a striped pattern with its own hue, stripe orientation and stripe frequency; each
sample draws its phase, a small orientation jitter, brightness and pixel noise from its own seed.
Classes are visually distinct, so a small CNN separates them within minutes on a CPU, while the
long-tailed counts still leave the head-class bias GALA and PN are meant to remove.
"""

from __future__ import annotations

import colorsys

import numpy as np

FREQUENCIES = (1.5, 2.5, 3.5)  # stripes per image side


def class_style(label: int, num_classes: int) -> tuple[np.ndarray, float, float]:
    """(RGB colour, orientation in radians, frequency) of a class."""
    hue = (label * 0.618034) % 1.0  # golden-ratio steps keep neighbouring classes far apart
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    angle = np.pi * ((label * 7) % num_classes) / num_classes
    return colour, angle, FREQUENCIES[label % len(FREQUENCIES)]


def render(label: int, num_classes: int, size: int, seed: int) -> np.ndarray:
    """One HxWx3 uint8 image of class ``label``, fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    colour, angle, freq = class_style(label, num_classes)
    angle += rng.normal(0.0, 0.08)
    yy, xx = np.mgrid[0:size, 0:size] / size
    wave = np.sin(
        2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi)
    )
    stripes = 1 / (1 + np.exp(-4 * wave))  # soft-edged stripes in [0, 1]
    background = 0.5 + 0.1 * rng.normal(size=3)
    contrast = rng.uniform(0.3, 0.9)  # faint samples make the task less than trivial
    img = background + contrast * stripes[..., None] * (colour - background)
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0.0, 0.12, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
