"""Synthetic raw data shaped like iNaturalist 2018, ImageNet-LT or Places-LT, in their formats.

    python -m gala_scale.shards synth --like inat2018 --scale 0.01 --root /tmp/inat_like

writes what the real dataset ships, so the real builders (``shards build inat|list``) turn it into
a shard set exactly as they would the real one:

* ``inat2018``: ``train2018.json`` and ``val2018.json`` (``images``, ``annotations``,
  ``categories`` with ``supercategory`` and ``kingdom``) and the JPEGs under
  ``train_val2018/<supercategory>/<category id>/``; 8,142 categories.
* ``imagenet_lt``, ``places_lt``: ``ImageNet_LT_{train,val,test}.txt`` or ``Places_LT_...``, one
  ``<relative path> <label>`` line an image, and the JPEGs at those paths; 1,000 or 365 classes.

Each class's training count is the real one (``lt_splits/cls_freq/*.json`` of the shared data)
times ``--scale``, rounded, at least one: every class is kept and the head-to-tail order of the
real profile holds. Val and test keep the real per-class counts, scaled the same way. The images
are the embedded synthetic kind (a class's own hue, stripe angle and frequency), cheap to make and
to tell apart, at the real datasets' typical sizes (500 x 375 for iNat and ImageNet, 256 x 256
for Places), so ``--max-side`` and the ``imagenet`` preset do real work.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gala_scale.shards import images, synthetic
from gala_scale.shards.sources import SourceError

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("GALA_DATA", ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class Profile:
    freq: str  # cls_freq file of the real training counts
    size: tuple[int, int]  # width, height of the images
    per_class: dict[str, int]  # real val/test images a class
    lists: str = ""  # list-file prefix; "" for the iNat JSON


PROFILES = {
    "inat2018": Profile("iNaturalist18.json", (500, 375), {"val": 3}),
    "imagenet_lt": Profile("ImageNet_LT.json", (500, 375), {"val": 20, "test": 50}, "ImageNet_LT"),
    "places_lt": Profile("Places_LT.json", (256, 256), {"val": 20, "test": 100}, "Places_LT"),
}

# iNat 2018's 14 supercategories with the kingdom of each and the number of categories given to
# it here, in category-id order (8,142 in all).
SUPERCATEGORIES = (
    ("Plantae", "Plantae", 2917),
    ("Insecta", "Animalia", 2031),
    ("Aves", "Animalia", 1258),
    ("Actinopterygii", "Animalia", 369),
    ("Fungi", "Fungi", 321),
    ("Reptilia", "Animalia", 284),
    ("Mollusca", "Animalia", 262),
    ("Mammalia", "Animalia", 234),
    ("Animalia", "Animalia", 178),
    ("Amphibia", "Animalia", 144),
    ("Arachnida", "Animalia", 114),
    ("Chromista", "Chromista", 25),
    ("Protozoa", "Protozoa", 4),
    ("Bacteria", "Bacteria", 1),
)


def real_counts(like: str, data: Path = DATA) -> list[int]:
    path = data / "lt_splits" / "cls_freq" / PROFILES[like].freq
    if not path.is_file():
        raise SourceError(f"{path}: missing (the real class profile; set GALA_DATA)")
    return [int(n) for n in json.loads(path.read_text())]


def scaled(counts: list[int], scale: float) -> list[int]:
    """``round(n * scale)``, at least one: monotone in n, so the head-to-tail order holds."""
    if scale <= 0:
        raise SourceError(f"--scale must be > 0, got {scale}")
    return [max(1, round(n * scale)) for n in counts]


def categories(num_classes: int) -> list[dict]:
    """iNat-style categories: id, name, supercategory, kingdom."""
    if num_classes != sum(n for _, _, n in SUPERCATEGORIES):
        raise SourceError(f"iNat 2018 has 8,142 categories, the profile has {num_classes}")
    out = []
    for supercategory, kingdom, n in SUPERCATEGORIES:
        for _ in range(n):
            cid = len(out)
            out.append(
                {
                    "id": cid,
                    "name": f"{supercategory} species {cid:04d}",
                    "supercategory": supercategory,
                    "kingdom": kingdom,
                }
            )
    return out


def _write_image(job: tuple) -> None:
    path, label, num_classes, size, seed = job
    width, height = size
    pixels = synthetic.render(label, num_classes, max(width, height), seed)[:height, :width]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(images.encode(pixels))
    tmp.replace(path)


def synthesize(
    like: str,
    scale: float,
    root: Path,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    workers: int = 1,
    data: Path = DATA,
) -> dict:
    """Write the raw dataset under ``root``; returns each split's per-class image counts."""
    profile = PROFILES[like]
    train = scaled(real_counts(like, data), scale)
    num_classes = len(train)
    counts = {"train": train}
    for split, n in profile.per_class.items():
        counts[split] = scaled([n] * num_classes, scale)
    size = size or profile.size
    cats = categories(num_classes) if not profile.lists else None
    jobs, listing = [], {}
    for split, per_class in counts.items():
        rows = []
        for label, n in enumerate(per_class):
            for i in range(n):
                if cats:
                    c = cats[label]
                    rel = f"train_val2018/{c['supercategory']}/{c['id']}/{split}_{i:05d}.jpg"
                else:
                    rel = f"{split}/c{label:04d}/{split}_{i:05d}.jpg"
                rows.append((rel, label))
                jobs.append((root / rel, label, num_classes, size, seed * 1_000_003 + len(jobs)))
        listing[split] = rows
    root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(jobs), unit="img", desc=f"{like} x {scale}", disable=None, file=sys.stderr)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_image, jobs, chunksize=64):
                bar.update()
    else:
        for job in jobs:
            _write_image(job)
            bar.update()
    bar.close()
    _write_index(like, root, listing, cats, size)
    return counts


def _write_index(like, root: Path, listing: dict, cats: list[dict] | None, size) -> None:
    """The dataset's own index files: iNat JSON, or the LT list files."""
    for split, rows in listing.items():
        if cats is None:
            path = root / f"{PROFILES[like].lists}_{split}.txt"
            text = "".join(f"{rel} {label}\n" for rel, label in rows)
        else:
            path = root / f"{split}2018.json"
            width, height = size
            doc = {
                "info": {"description": f"synthetic, shaped like iNaturalist 2018 ({split})"},
                "images": [
                    {"id": i, "file_name": rel, "width": width, "height": height}
                    for i, (rel, _) in enumerate(rows)
                ],
                "annotations": [
                    {"id": i, "image_id": i, "category_id": cats[label]["id"]}
                    for i, (_, label) in enumerate(rows)
                ],
                "categories": cats,
            }
            text = json.dumps(doc)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def build_command(like: str, root: Path, out: Path) -> list[str]:
    """The ``shards build`` arguments that turn what :func:`synthesize` wrote into a shard set."""
    profile = PROFILES[like]
    splits = ("train", *profile.per_class)
    if not profile.lists:
        args = ["build", "inat", "--root", str(root)]
        for split in splits:
            args += ["--annotations", f"{split}={root / f'{split}2018.json'}"]
    else:
        args = ["build", "list", "--root", str(root)]
        for split in splits:
            args += ["--list", f"{split}={root / f'{profile.lists}_{split}.txt'}"]
    return [*args, "--out", str(out)]
