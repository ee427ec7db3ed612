"""Image decoding and the eval preprocessing recorded in the artifact.

This mirrors ``gala_scale.data.presets.eval_array`` (the training eval transform) from the
artifact's ``preprocess`` record alone, without importing the training package (and so torch):
resize the shorter side (bilinear, antialiased) if asked, centre crop (halves round up),
normalise with the stored mean/std, channels first. tests/test_serve.py checks the two agree.
Presets without an eval resize (cifar) expect crop x crop images; other sizes are resized.

Only the formats in ``formats`` are opened (Pillow tries no other decoder), the decoded size is
bounded, and so is the size the eval resize would produce: a 10,000 x 1 PNG of a few hundred
bytes passes any pixel limit but would be resized to 2,560,000 x 256 by a 256-pixel shorter side.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from gala_serve.errors import RequestError, TooLarge

FORMATS = ("JPEG", "PNG", "WEBP")


def decode(
    data: bytes,
    max_pixels: int,
    what: str = "image",
    formats: tuple[str, ...] = FORMATS,
    pre: dict | None = None,
    max_resized_pixels: int | None = None,
) -> Image.Image:
    """Decode encoded image bytes fully; 4xx errors for empty, oversized, broken images and
    formats outside ``formats``. With ``pre`` and ``max_resized_pixels``, also refuse an image
    the eval resize of ``pre`` would blow up past that many pixels (before decoding it)."""
    if not data:
        raise RequestError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
        if img.width * img.height > max_pixels:
            raise TooLarge(
                f"{what} has {img.width}x{img.height} pixels, more than the limit of {max_pixels}"
            )
        if pre is not None and max_resized_pixels is not None:
            w, h = resized_size(img.size, pre)
            if w * h > max_resized_pixels:
                raise TooLarge(
                    f"{what} of {img.width}x{img.height} pixels would be resized to {w}x{h}, "
                    f"more than the limit of {max_resized_pixels} pixels after resize"
                )
        img.load()  # a full decode: a truncated JPEG fails here
    except TooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TooLarge(f"{what} is too large: {err}") from err
    except UnidentifiedImageError as err:  # its text names a BytesIO object at some address
        raise RequestError(
            f"{what} could not be decoded as an image of format {'/'.join(formats)} (no decoder "
            "of those recognises its bytes)"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(
            f"{what} could not be decoded as an image of format {'/'.join(formats)} ({err})"
        ) from err
    return img


def _shorter_to(size: tuple[int, int], target: int) -> tuple[int, int]:
    w, h = size
    if w <= h:
        return target, max(1, round(h * target / w))
    return max(1, round(w * target / h)), target


def resized_size(size: tuple[int, int], pre: dict) -> tuple[int, int]:
    """(w, h) of an image of ``size`` after the eval resize of ``pre``."""
    if pre.get("eval_resize"):
        return size if min(size) == pre["eval_resize"] else _shorter_to(size, pre["eval_resize"])
    return (pre["crop"], pre["crop"])


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    if min(img.size) == size:
        return img
    return img.resize(_shorter_to(img.size, size), Image.Resampling.BILINEAR)


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
