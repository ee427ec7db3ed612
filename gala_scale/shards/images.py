"""Image checks and encoding for the shard builder.

JPEGs in RGB or grayscale are stored byte for byte (no re-encoding loss); every other format or
mode (PNG, CMYK, palette, alpha, ...) and raw pixel arrays become RGB JPEG at ``JPEG_QUALITY``.
Alpha is composited over white. ``max_side`` shrinks larger images (and re-encodes them).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95
KEEP_JPEG_MODES = ("RGB", "L")


class BadImage(ValueError):
    """The source cannot be decoded; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _jpeg_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def encode(source: bytes | np.ndarray, max_side: int | None = None) -> bytes:
    """JPEG bytes for ``source`` (encoded file bytes or an HxWx3 uint8 array)."""
    if isinstance(source, np.ndarray):
        img = Image.fromarray(source)
        return _jpeg_bytes(_shrink(img, max_side))
    try:
        img = Image.open(io.BytesIO(source))
        img.load()  # a full decode: catches truncated and corrupt files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from err
    too_big = max_side is not None and max(img.size) > max_side
    if img.format == "JPEG" and img.mode in KEEP_JPEG_MODES and not too_big:
        return source
    return _jpeg_bytes(_shrink(_to_rgb(img), max_side))


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode stored image bytes to an HxWx3 uint8 array (raises BadImage)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from err
