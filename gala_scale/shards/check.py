"""``verify`` a shard set against its manifest, and ``index`` (adopt) shards a user already has."""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from gala_scale.shards import images, tario
from gala_scale.shards.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    ManifestError,
    load_manifest,
    write_json_atomic,
)

ADOPTED_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def check_shard(root: Path, shard: dict, num_classes: int, image_ext: str) -> list[str]:
    """Every problem of one shard of the set at ``root`` (its manifest entry ``shard``): its
    sha256, each sample's label and image, its sample count and its DALI index."""
    return _check_shard((root, shard, num_classes, image_ext))[0]


def _check_shard(job: tuple[Path, dict, int, str]) -> tuple[list[str], Counter]:
    root, shard, num_classes, image_ext = job
    tar, problems, labels = root / shard["file"], [], Counter()
    if not tar.is_file():
        return [f"{shard['file']}: missing"], labels
    if tario.sha256(tar) != shard["sha256"]:
        problems.append(f"{shard['file']}: sha256 differs from the manifest")
    count = 0
    try:
        for key, files in tario.iter_tar(tar):
            count += 1
            problems += _check_sample(shard["file"], key, files, num_classes, image_ext, labels)
    except Exception as err:  # a damaged tar can fail in many ways; report, don't crash
        problems.append(f"{shard['file']}: unreadable tar ({type(err).__name__}: {err})")
    if count != shard["num_samples"]:
        problems.append(f"{shard['file']}: {count} samples, manifest says {shard['num_samples']}")
    index = root / shard["index"]
    if not index.is_file():
        problems.append(f"{shard['index']}: missing DALI index")
    elif not problems:
        fresh = index.with_name(index.name + ".check")
        tario.write_index(tar, fresh)
        if fresh.read_text() != index.read_text():
            problems.append(f"{shard['index']}: does not match the tar")
        fresh.unlink()
    return problems, labels


def _check_sample(file, key, files, num_classes, image_ext, labels) -> list[str]:
    where = f"{file}: sample {key}"
    if "cls" not in files or image_ext not in files:
        return [f"{where}: needs '{image_ext}' and 'cls', has {sorted(files)}"]
    text = files["cls"].decode(errors="replace").strip()
    if not text.isdigit() or int(text) >= num_classes:
        return [f"{where}: label {text!r} is not in [0, {num_classes})"]
    labels[int(text)] += 1
    try:
        images.decode_rgb(files[image_ext])
    except images.BadImage as err:
        return [f"{where}: image does not decode ({err})"]
    return []


def verify(root: Path, workers: int = 1) -> list[str]:
    """Every problem found in the set at ``root``; an empty list means it is whole."""
    try:
        manifest = load_manifest(root)
    except ManifestError as err:
        return [str(err)]
    problems = []
    for split, info in manifest["splits"].items():
        jobs = [(root, s, manifest["num_classes"], manifest["image_ext"]) for s in info["shards"]]
        counts: Counter = Counter()
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(max(1, workers)) as pool:
            results = pool.imap(_check_shard, jobs)
            for found, labels in tqdm(
                results,
                total=len(jobs),
                desc=f"verify {split}",
                unit="shard",
                disable=None,
                file=sys.stderr,
            ):
                problems += found
                counts += labels
        got = [counts.get(k, 0) for k in range(manifest["num_classes"])]
        if not problems and got != info["class_counts"]:
            problems.append(f"{split}: class counts in the shards differ from the manifest")
    return problems


def _parse_label(data: bytes, where: str) -> int:
    text = data.decode(errors="replace").strip()
    if not text.lstrip("-").isdigit():
        raise ManifestError(f"{where}: 'cls' is {text!r}, not an integer class index")
    return int(text)


def adopt(
    root: Path,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    dataset: str | None = None,
) -> dict:
    """Write DALI indexes and a manifest for existing WebDataset shards, images untouched.

    Tars in ``root/<split>/`` become that split; tars directly in ``root`` become ``train``.
    """
    tars = {p.parent.name: [] for p in root.glob("*/*.tar")}
    for tar in sorted(root.glob("*/*.tar")):
        tars[tar.parent.name].append(tar)
    if list(root.glob("*.tar")):
        tars.setdefault("train", []).extend(sorted(root.glob("*.tar")))
    if not tars:
        raise ManifestError(f"{root}: no .tar shards in it or in its split folders")
    per_shard, exts = {}, set()
    for split, files in tars.items():
        for tar in files:
            labels = []
            for key, parts in tario.iter_tar(tar):
                where = f"{tar}: sample {key}"
                image = [e for e in parts if e in ADOPTED_IMAGE_EXTS]
                if "cls" not in parts or not image:
                    raise ManifestError(f"{where}: needs an image and 'cls', has {sorted(parts)}")
                exts.add(image[0])
                labels.append(_parse_label(parts["cls"], where))
            tario.write_index(tar, tar.with_suffix(".idx"))
            per_shard[tar] = (split, labels)
    all_labels = [label for _, labels in per_shard.values() for label in labels]
    if num_classes is None:
        num_classes = len(class_names) if class_names else max(all_labels) + 1
    if min(all_labels) < 0 or max(all_labels) >= num_classes:
        raise ManifestError(
            f"{root}: labels span {min(all_labels)}..{max(all_labels)}, outside [0, {num_classes})"
        )
    if len(exts) != 1:
        raise ManifestError(f"{root}: mixed image extensions {sorted(exts)}; one is needed")
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset or root.name,
        "num_classes": num_classes,
        "class_names": class_names or [str(k) for k in range(num_classes)],
        "image_ext": exts.pop(),
        "label_encoding": "cls: the class index as ASCII decimal digits",
        "adopted": True,
        "splits": {},
        "excluded": [],
    }
    for split in tars:
        shards = [(t, labels) for t, (s, labels) in per_shard.items() if s == split]
        counts = Counter(label for _, labels in shards for label in labels)
        manifest["splits"][split] = {
            "num_samples": sum(counts.values()),
            "class_counts": [counts.get(k, 0) for k in range(num_classes)],
            "shards": [
                {
                    "file": str(t.relative_to(root)),
                    "index": str(t.with_suffix(".idx").relative_to(root)),
                    "num_samples": len(labels),
                    "sha256": tario.sha256(t),
                }
                for t, labels in shards
            ],
        }
    write_json_atomic(root / MANIFEST, manifest)
    return manifest
