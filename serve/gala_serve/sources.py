"""What gala-batch reads: a shard set's split (streamed from its tars), an image folder
(``<class>/<image>``) or a list file (``<path> [label]`` a line), as :class:`Item` s whose
image is read only when it is sent."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class BadItem(Exception):
    """An input item that cannot be sent (no image in its sample, an unreadable file)."""


@dataclass
class Item:
    id: str
    label: int | None
    load: Callable[[], bytes]  # the encoded image; BadItem or OSError when there is none


def split_key(name: str) -> tuple[str, str]:
    """``dir.v2/abc.seg.jpg`` -> (``dir.v2/abc``, ``seg.jpg``): a WebDataset sample's key ends at
    the first dot of the file name, never at a dot of its folders. The shard tools' own rule
    (``gala_scale.shards.tario.split_key``), mirrored because this package must not import the
    training one (torch); tests/test_serve_faults.py holds the two to each other."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _label(raw: bytes | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


def _sample(key: str, parts: dict[str, bytes], ext: str) -> Item:
    label = _label(parts.get("cls"))
    data = parts.get(ext)
    if data is not None:
        return Item(key, label, lambda: data)
    problem = f"the sample has no {ext!r} file, only {sorted(parts)}"

    def missing() -> bytes:
        raise BadItem(problem)

    return Item(key, label, missing)


def _from_shards(root: Path, split: str) -> Iterator[Item]:
    """A shard set's samples, streamed: WebDataset keeps a sample's files next to each other."""
    manifest = json.loads((root / "manifest.json").read_text())
    if split not in manifest["splits"]:
        raise ValueError(f"{root}: no split {split!r}; it has {sorted(manifest['splits'])}")
    ext = manifest.get("image_ext", "jpg")
    for shard in manifest["splits"][split]["shards"]:
        key, parts = None, {}
        try:
            with tarfile.open(root / shard["file"]) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name, suffix = split_key(member.name)
                    if name != key and parts:
                        yield _sample(key, parts, ext)
                        parts = {}
                    key = name
                    parts[suffix] = tar.extractfile(member).read()
        except tarfile.TarError as err:
            raise ValueError(f"{root / shard['file']}: not a readable tar ({err})") from err
        if parts:
            yield _sample(key, parts, ext)


def _from_folder(root: Path, class_names: list[str]) -> Iterator[Item]:
    index = {name: i for i, name in enumerate(class_names)}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        parent = path.parent.name if path.parent != root else None
        yield Item(str(path.relative_to(root)), index.get(parent), path.read_bytes)


def _from_list(path: Path, root: Path) -> Iterator[Item]:
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                raise ValueError(f"{path}:{number}: expected '<path> [label]', got {line!r}")
            image = root / parts[0]
            yield Item(parts[0], int(parts[1]) if len(parts) == 2 else None, image.read_bytes)


def items(source: Path, split: str, class_names: list[str], root: Path | None) -> Iterator[Item]:
    """The images of ``source``, one at a time."""
    if (source / "manifest.json").is_file():
        return _from_shards(source, split)
    if source.is_dir():
        return _from_folder(source, class_names)
    if source.is_file():
        return _from_list(source, root or source.parent)
    raise ValueError(f"{source}: not a shard set, an image folder or a list file")
