"""Image decoding and the eval preprocessing recorded in the artifact.

This mirrors ``gala_scale.data.presets.eval_array`` (the training eval transform) from the
artifact's ``preprocess`` record alone, without importing the training package (and so torch):
resize the shorter side (bilinear, antialiased) if asked, centre crop (halves round up),
normalise with the stored mean/std, channels first. tests/test_serve.py checks the two agree.
Presets without an eval resize (cifar) expect crop x crop images; other sizes are resized.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from gala_serve.errors import RequestError, TooLarge


def decode(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode encoded image bytes fully; 4xx errors for empty, oversized or broken images."""
    if not data:
        raise RequestError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise TooLarge(
                f"{what} has {img.width}x{img.height} pixels, more than the limit of {max_pixels}"
            )
        img.load()  # a full decode: a truncated JPEG fails here
    except TooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TooLarge(f"{what} is too large: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"{what} could not be decoded as an image ({err})") from err
    return img


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    new = (size, max(1, round(h * size / w))) if w <= h else (max(1, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.BILINEAR)


def eval_array(img: Image.Image, pre: dict) -> np.ndarray:
    """HxW image -> 3 x crop x crop float32, exactly the training eval transform."""
    img = img.convert("RGB")
    crop = pre["crop"]
    if pre.get("eval_resize"):
        img = _resize_shorter(img, pre["eval_resize"])
    elif img.size != (crop, crop):
        # Presets without an eval resize (cifar) train on crop x crop images; other sizes are
        # resized to that rather than cut.
        img = img.resize((crop, crop), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    arr = arr[top : top + crop, left : left + crop]
    mean = np.asarray(pre["mean"], dtype=np.float32) * 255
    std = np.asarray(pre["std"], dtype=np.float32) * 255
    return ((arr.astype(np.float32) - mean) / std).transpose(2, 0, 1)
