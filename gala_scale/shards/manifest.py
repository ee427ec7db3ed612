"""The shard set's ``manifest.json``: what is in the set, how it was built, how to check it."""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format_version", "dataset", "num_classes", "class_names", "splits", "image_ext")
SPLIT_REQUIRED = ("num_samples", "class_counts", "shards")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent; the message names the file and field."""


def write_json_atomic(path: Path, data: dict) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_manifest(root: Path | str) -> dict:
    """Read and check ``root/manifest.json``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (not a complete shard set)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing fields {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest['format_version']}, expected {FORMAT_VERSION}"
        )
    num_classes = manifest["num_classes"]
    if len(manifest["class_names"]) != num_classes:
        raise ManifestError(
            f"{path}: class_names has {len(manifest['class_names'])} names "
            f"for num_classes {num_classes}"
        )
    for split, info in manifest["splits"].items():
        lost = [key for key in SPLIT_REQUIRED if key not in info]
        if lost:
            raise ManifestError(f"{path}: splits.{split} misses {lost}")
        if len(info["class_counts"]) != num_classes:
            raise ManifestError(
                f"{path}: splits.{split}.class_counts has "
                f"{len(info['class_counts'])} entries for {num_classes} classes"
            )
        if (
            sum(info["class_counts"]) != info["num_samples"]
            or sum(s["num_samples"] for s in info["shards"]) != info["num_samples"]
        ):
            raise ManifestError(f"{path}: splits.{split} counts do not add up to num_samples")
    return manifest
