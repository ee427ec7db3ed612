"""Tiny raw datasets made on the fly for the shard builder tests."""

from __future__ import annotations

import io
import pickle
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(rgb: np.ndarray, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


def random_rgb(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_cifar10_pickles(root: Path, per_class: int, test_per_class: int) -> None:
    """An official-format CIFAR-10 python folder with few images a class."""
    root.mkdir(parents=True)
    names = [f"c{k}".encode() for k in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    rng = np.random.default_rng(0)
    labels = [k for k in range(10) for _ in range(per_class)]
    for i in range(5):  # five data batches, like the real thing
        part = labels[i::5]
        data = rng.integers(0, 256, (len(part), 3072), dtype=np.uint8)
        with open(root / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": data, b"labels": part}, f)
    test_labels = [k for k in range(10) for _ in range(test_per_class)]
    data = rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": test_labels}, f)


def write_image_tree(root: Path, counts: dict[str, int], suffix: str = ".jpg") -> list[Path]:
    paths = []
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = root / cls / f"{i:04d}{suffix}"
            path.write_bytes(jpeg_bytes(random_rgb(zlib.crc32(f"{cls}/{i}".encode()))))
            paths.append(path)
    return paths


def build_small_synthetic(out: Path, **options: int) -> Path:
    """A 6-class synthetic set (IF 20, 120 images in the head class, 20 test images a class)."""
    from gala_scale.shards.__main__ import main as shards_main

    settings = {
        "num-classes": 6,
        "max-per-class": 120,
        "imbalance-factor": 20,
        "test-per-class": 20,
        "workers": 1,
        **options,
    }
    argv = ["build", "synthetic", "--out", str(out)]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    assert shards_main(argv) == 0
    return out


def corrupt_an_image(tar: Path, which: int = 3) -> str:
    """Zero the middle of the ``which``-th image of ``tar`` in place (offsets, sizes and the
    DALI index stay valid, the sha256 does not); returns the member's name."""
    import tarfile

    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as members:
        image = [m for m in members.getmembers() if m.name.endswith(".jpg")][which]
    data[image.offset_data + 20 : image.offset_data + image.size - 2] = bytes(image.size - 22)
    tar.write_bytes(data)
    return image.name
