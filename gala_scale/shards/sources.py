"""Raw datasets -> a build plan: which samples go to which split, with which label.

Each ``plan_*`` function reads a source's listing (not its pixels) and returns a :class:`Plan`;
the builder's worker processes then load and encode the images. Sample keys are
``<pool>_<index>``: the raw pool (``train``, ``test``, a list file's split, ...) and the position
in it, so a sample's origin is readable from its key and splits drawn from one pool are visibly
disjoint.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gala_scale.shards import synthetic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MISSING_SHOWN = 5


class SourceError(ValueError):
    """The raw dataset is not what the build was told it is; the message names the file."""


@dataclass
class Item:
    key: str
    label: int
    ref: object  # a file path, ("array", pool, index) or ("synthetic", seed)


@dataclass
class Plan:
    dataset: str
    class_names: list[str]
    splits: dict[str, list[Item]]
    excluded: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    image_size: int = 0  # synthetic only
    val_from: str = ""  # how val was drawn from the train pool (VAL_FROM); "" for a source's own

    def load(self, ref: object) -> bytes | np.ndarray:
        """The source of one sample: encoded file bytes or an HxWx3 uint8 array."""
        if isinstance(ref, str):
            return Path(ref).read_bytes()
        kind, *args = ref
        if kind == "array":
            pool, index = args
            return self.arrays[pool][index]
        seed, label = args
        return synthetic.render(label, len(self.class_names), self.image_size, seed)


def long_tailed_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """n_i = floor(n_max * (1 / IF)^(i / (C - 1))) for classes i = 0 .. C-1."""
    if imbalance_factor < 1:
        raise SourceError(f"--imbalance-factor must be >= 1, got {imbalance_factor}")
    ratio = 1.0 / imbalance_factor
    return [int(np.floor(n_max * ratio ** (i / (num_classes - 1)))) for i in range(num_classes)]


VAL_FROM = ("reserved", "leftover")


def split_long_tailed(
    per_class: list[list[Item]],
    imbalance_factor: float | None,
    val_per_class: int,
    rng: np.random.Generator,
    val_fraction: float = 0.0,
    val_from: str = "leftover",
) -> tuple[list[Item], list[Item], list[str]]:
    """Pick the long-tailed train subset and a val split.

    Val takes ``val_per_class`` images a class, or with ``val_fraction`` that fraction of each
    class (at least one). Without an imbalance factor every image not taken for val is kept.

    ``val_from="reserved"`` sets val aside first and subsamples the rest, so every class is in
    val and the head trains on ``n_max - v`` images. ``"leftover"`` subsamples first and draws
    val from the images the subset leaves out: the literature's training counts (12,406 at
    CIFAR-10 IF 100), a train subset that does not depend on the val size, and no val images of
    a class whose long-tailed count takes all its images (the head); that is reported.
    """
    if val_from not in VAL_FROM:
        raise SourceError(f"--val-from must be one of {', '.join(VAL_FROM)}, got {val_from!r}")
    orders = [rng.permutation(len(items)) for items in per_class]
    wants = [
        max(1, round(val_fraction * len(items))) if val_fraction else val_per_class
        for items in per_class
    ]
    pools = (
        orders if val_from == "leftover" else [o[w:] for o, w in zip(orders, wants, strict=True)]
    )
    counts = (
        long_tailed_counts(max(len(p) for p in pools), len(per_class), imbalance_factor)
        if imbalance_factor
        else None
    )
    train, val, short = [], [], []
    for label, items in enumerate(per_class):
        order, want, pool = orders[label], wants[label], pools[label]
        if val_from == "reserved":
            val_idx = order[:want]
            train_idx = pool if counts is None else pool[: counts[label]]
        elif counts is None:
            val_idx, train_idx = order[:want], order[want:]
        else:
            keep = min(counts[label], len(items))
            train_idx, val_idx = order[:keep], order[keep : keep + want]
        train += [items[i] for i in sorted(train_idx)]
        val += [items[i] for i in sorted(val_idx)]
        if len(val_idx) < want:
            short.append(f"{label} ({len(val_idx)})")
    warnings = []
    if short:
        warnings.append(
            f"val has fewer images than asked for classes {', '.join(short[:10])}: "
            + (
                "they have fewer images than that"
                if val_from == "reserved"
                else "the long-tailed subset keeps (nearly) all their training images "
                "(--val-from reserved gives every class its val images)"
            )
        )
    return train, val, warnings


def _by_class(items: list[Item], num_classes: int) -> list[list[Item]]:
    per_class: list[list[Item]] = [[] for _ in range(num_classes)]
    for item in items:
        per_class[item.label].append(item)
    return per_class


def _long_tailed_plan(
    dataset,
    class_names,
    pools,
    imbalance_factor,
    val_per_class,
    seed,
    val_fraction=0.0,
    val_from="leftover",
    **kw,
):
    """Train pool -> long-tailed train + val; every other pool kept whole."""
    train_pool = pools.pop("train")
    rng = np.random.default_rng(seed)
    train, val, warnings = split_long_tailed(
        _by_class(train_pool, len(class_names)),
        imbalance_factor,
        val_per_class,
        rng,
        val_fraction,
        val_from,
    )
    splits = {"train": train}
    if val_per_class or val_fraction:
        if "val" in pools:
            raise SourceError("the source has its own val split; pass --val-per-class 0")
        splits["val"] = val
        kw["val_from"] = val_from
    splits.update(pools)
    return Plan(dataset, class_names, splits, warnings=warnings, **kw)


# --- CIFAR ------------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise SourceError(f"{path}: missing (not an official CIFAR python folder?)")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_arrays(root: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, list[int]]]]:
    if (root / "batches.meta").exists():  # CIFAR-10
        names = [n.decode() for n in _unpickle(root / "batches.meta")[b"label_names"]]
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = b"labels"
    else:  # CIFAR-100
        names = [n.decode() for n in _unpickle(root / "meta")[b"fine_label_names"]]
        files, label_key = {"train": ["train"], "test": ["test"]}, b"fine_labels"
    pools = {}
    for pool, batch_files in files.items():
        batches = [_unpickle(root / name) for name in batch_files]
        data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = [int(x) for b in batches for x in b[label_key]]
        pools[pool] = (np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels)
    return names, pools


def cifar_val_default(num_classes: int) -> int:
    """Val images a class when not given: 50 for CIFAR-10, 10 for CIFAR-100."""
    return max(10, 500 // num_classes)


def plan_cifar(
    root: Path, imbalance_factor, val_per_class, seed, dataset=None, val_from="reserved"
) -> Plan:
    """CIFAR-10/100 from the official python folder or an ImageFolder with train/ and test/.

    ``val_per_class`` None: :func:`cifar_val_default`. Val is reserved before subsampling by
    default (every class in val); ``val_from="leftover"`` gives the literature's counts.
    """
    if (root / "train").is_dir():
        names, pools = folder_pools(root, ("train", "test"))
        arrays, default_name = {}, root.name
    else:
        names, raw = _cifar_arrays(root)
        pools = {
            pool: [Item(f"{pool}_{i:08d}", lbl, ("array", pool, i)) for i, lbl in enumerate(labels)]
            for pool, (_, labels) in raw.items()
        }
        arrays, default_name = {pool: data for pool, (data, _) in raw.items()}, f"cifar{len(names)}"
    if val_per_class is None:
        val_per_class = cifar_val_default(len(names))
    return _long_tailed_plan(
        dataset or default_name,
        names,
        pools,
        imbalance_factor,
        val_per_class,
        seed,
        val_from=val_from,
        arrays=arrays,
    )


# --- folders ----------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def folder_pools(root: Path, split_names) -> tuple[list[str], dict[str, list[Item]]]:
    """``root/<split>/<class>/<image>`` for each split present; classes from ``train/``."""
    class_dirs = sorted(d for d in (root / "train").iterdir() if d.is_dir())
    if not class_dirs:
        raise SourceError(f"{root / 'train'}: no class folders")
    names = [d.name for d in class_dirs]
    pools = {}
    for split in split_names:
        if not (root / split).is_dir():
            continue
        unknown = sorted({d.name for d in (root / split).iterdir() if d.is_dir()} - set(names))
        if unknown:
            raise SourceError(f"{root / split}: classes not in train/: {unknown[:5]}")
        paths = [
            (p, names.index(p.relative_to(root / split).parts[0])) for p in _images_in(root / split)
        ]
        pools[split] = [Item(f"{split}_{i:08d}", lbl, str(p)) for i, (p, lbl) in enumerate(paths)]
    return names, pools


def plan_imagefolder(
    root: Path,
    imbalance_factor,
    val_per_class,
    seed,
    dataset=None,
    val_fraction=0.0,
    val_from="leftover",
) -> Plan:
    """``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``."""
    if (root / "train").is_dir():
        names, pools = folder_pools(root, ("train", "val", "test"))
    else:
        names = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not names:
            raise SourceError(f"{root}: no class folders")
        items = [(p, label) for label, name in enumerate(names) for p in _images_in(root / name)]
        pools = {"train": [Item(f"train_{i:08d}", lbl, str(p)) for i, (p, lbl) in enumerate(items)]}
    return _long_tailed_plan(
        dataset or root.name,
        names,
        pools,
        imbalance_factor,
        val_per_class,
        seed,
        val_fraction,
        val_from,
    )


# --- list files and iNaturalist JSON -----------------------------------------------------------


def _check_paths(plan_items: dict[str, list[Item]], skip_missing: bool) -> list[dict]:
    """Missing files are an error (how many, the first few) or, if asked, excluded and listed."""
    missing = [
        (split, item)
        for split, items in plan_items.items()
        for item in items
        if not Path(item.ref).is_file()
    ]
    if missing and not skip_missing:
        first = ", ".join(str(item.ref) for _, item in missing[:MISSING_SHOWN])
        raise SourceError(
            f"{len(missing)} image files are missing (first: {first}); "
            "pass --skip-missing to build without them"
        )
    gone = {id(item) for _, item in missing}
    for split in plan_items:
        plan_items[split] = [item for item in plan_items[split] if id(item) not in gone]
    return [{"split": s, "source": str(i.ref), "reason": "missing file"} for s, i in missing]


def _check_labels(splits: dict[str, list[Item]], num_classes: int, where: dict[str, str]) -> None:
    for split, items in splits.items():
        bad = [item.label for item in items if not 0 <= item.label < num_classes]
        if bad:
            raise SourceError(
                f"{where[split]}: {len(bad)} labels outside [0, {num_classes}), e.g. {bad[0]}"
            )
    counts = np.bincount([i.label for i in splits.get("train", [])], minlength=num_classes)
    empty = np.flatnonzero(counts == 0).tolist() if "train" in splits else []
    if empty:
        raise SourceError(f"{where['train']}: classes with no training image: {empty[:10]}")


def _read_list(path: Path, root: Path, pool: str) -> list[Item]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise SourceError(f"{path}:{number}: expected '<relative path> <label>', got {line!r}")
        items.append(Item(f"{pool}_{len(items):08d}", int(parts[1]), str(root / parts[0])))
    return items


def plan_list(
    root: Path, lists: dict[str, Path], num_classes, class_names, skip_missing, dataset=None
) -> Plan:
    """ImageNet-LT / Places-LT style: ``<relative path> <label>`` lines, one file per split."""
    splits = {split: _read_list(path, root, split) for split, path in lists.items()}
    names = _class_names(class_names, num_classes, splits)
    _check_labels(splits, len(names), {s: str(p) for s, p in lists.items()})
    excluded = _check_paths(splits, skip_missing)
    return Plan(dataset or root.name, names, splits, excluded=excluded)


def _class_names(names_file: Path | None, num_classes: int | None, splits) -> list[str]:
    if names_file is not None:
        names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
        if num_classes is not None and len(names) != num_classes:
            raise SourceError(f"{names_file}: {len(names)} names for {num_classes} classes")
        return names
    if num_classes is None:
        num_classes = 1 + max(item.label for items in splits.values() for item in items)
    return [str(i) for i in range(num_classes)]


def plan_inat(root: Path, annotations: dict[str, Path], skip_missing, dataset=None) -> Plan:
    """iNaturalist 2018 style JSON (images, annotations, categories) per split."""
    docs = {}
    for split, path in annotations.items():
        doc = json.loads(path.read_text())
        for field_name in ("images", "annotations", "categories"):
            if field_name not in doc:
                raise SourceError(f"{path}: no '{field_name}' field")
        docs[split] = doc
    categories = sorted(
        {(c["id"], c.get("name", str(c["id"]))) for doc in docs.values() for c in doc["categories"]}
    )
    label_of = {cid: label for label, (cid, _) in enumerate(categories)}
    splits = {}
    for split, doc in docs.items():
        files = {img["id"]: img["file_name"] for img in doc["images"]}
        items = []
        for ann in doc["annotations"]:
            if ann["image_id"] not in files or ann["category_id"] not in label_of:
                raise SourceError(
                    f"{annotations[split]}: annotation {ann} names an unknown image or category"
                )
            path = root / files[ann["image_id"]]
            items.append(Item(f"{split}_{len(items):08d}", label_of[ann["category_id"]], str(path)))
        splits[split] = items
    _check_labels(splits, len(categories), {s: str(p) for s, p in annotations.items()})
    excluded = _check_paths(splits, skip_missing)
    return Plan(dataset or "inat", [name for _, name in categories], splits, excluded=excluded)


# --- synthetic --------------------------------------------------------------------------------


def plan_synthetic(
    num_classes,
    imbalance_factor,
    max_per_class,
    val_per_class,
    test_per_class,
    image_size,
    seed,
    dataset=None,
) -> Plan:
    """A procedurally generated long-tailed set: train by the formula, val and test balanced."""
    if num_classes < 2 or image_size < 8:
        raise SourceError("synthetic needs --num-classes >= 2 and --image-size >= 8")
    counts = {
        "train": long_tailed_counts(max_per_class, num_classes, imbalance_factor),
        "val": [val_per_class] * num_classes,
        "test": [test_per_class] * num_classes,
    }
    splits = {}
    for pool_id, (split, per_class) in enumerate(counts.items()):
        labels = [label for label, n in enumerate(per_class) for _ in range(n)]
        splits[split] = [
            Item(
                f"{split}_{i:08d}",
                label,
                ("synthetic", seed * 1_000_003 + pool_id * 10**7 + i, label),
            )
            for i, label in enumerate(labels)
        ]
    if not splits["val"]:
        del splits["val"]
    names = [f"class_{k:03d}" for k in range(num_classes)]
    return Plan(dataset or "synthetic", names, splits, image_size=image_size)
