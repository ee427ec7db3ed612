"""gala-batch: stream a shard set, an image folder or a list file through a gala-serve server.

    gala-batch --server http://127.0.0.1:8000 --input shards/x [--split test] --out preds.jsonl
               [--concurrency 8] [--transductive] [--top-k 5]

Predictions are written in input order, one JSON object a line. Transient failures (connection
errors, 429, 5xx) are retried with backoff. When labels are known, accuracy and many/medium/few
shot accuracy (from the artifact's training class counts) are printed. ``--transductive`` applies
the paper's PN over the whole job instead of the stored scales: raw probabilities are collected
and each class's column is divided by its total mass^tau at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gala_serve.client import Client, ServerError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Item:
    id: str
    label: int | None
    load: Callable[[], bytes]


def _from_shards(root: Path, split: str) -> Iterator[Item]:
    manifest = json.loads((root / "manifest.json").read_text())
    if split not in manifest["splits"]:
        raise ValueError(f"{root}: no split {split!r}; it has {sorted(manifest['splits'])}")
    ext = manifest.get("image_ext", "jpg")
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(root / shard["file"]) as tar:
            files: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if member.isfile():
                    key, _, suffix = member.name.partition(".")
                    files.setdefault(key, {})[suffix] = tar.extractfile(member).read()
        for key, parts in files.items():
            data = parts[ext]
            yield Item(key, int(parts["cls"]), lambda data=data: data)


def _from_folder(root: Path, class_names: list[str]) -> Iterator[Item]:
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        parent = path.parent.name if path.parent != root else None
        label = class_names.index(parent) if parent in class_names else None
        yield Item(str(path.relative_to(root)), label, path.read_bytes)


def _from_list(path: Path, root: Path) -> Iterator[Item]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"{path}:{number}: expected '<path> [label]', got {line!r}")
        image = root / parts[0]
        yield Item(parts[0], int(parts[1]) if len(parts) == 2 else None, image.read_bytes)


def items(source: Path, split: str, class_names: list[str], root: Path | None) -> list[Item]:
    if (source / "manifest.json").is_file():
        return list(_from_shards(source, split))
    if source.is_dir():
        return list(_from_folder(source, class_names))
    if source.is_file():
        return list(_from_list(source, root or source.parent))
    raise ValueError(f"{source}: not a shard set, an image folder or a list file")


def shot_accuracy(preds: np.ndarray, labels: np.ndarray, counts: list[int] | None) -> dict:
    """Top-1 and the mean per-class accuracy of many (>100), medium (20-100), few (<20) shots."""
    result = {"top1": float((preds == labels).mean())}
    if counts is None:
        return result
    counts = np.asarray(counts)
    k = len(counts)
    seen = np.bincount(labels, minlength=k)
    hits = np.bincount(labels[preds == labels], minlength=k)
    groups = {"many": counts > 100, "medium": (counts >= 20) & (counts <= 100), "few": counts < 20}
    for name, mask in groups.items():
        mask = mask & (seen > 0)
        result[name] = float((hits[mask] / seen[mask]).mean()) if mask.any() else None
    return result


def run(args: argparse.Namespace) -> dict:
    client = Client(args.server, retries=args.retries)
    meta = client.json("GET", f"/v2/models/{args.model_name}")["parameters"]
    todo = items(args.input, args.split, meta["class_names"], args.root)
    if not todo:
        raise ValueError(f"{args.input}: no images")

    def one(item: Item) -> dict:
        return client.classify(item.load(), top_k=args.top_k, full=args.transductive)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(one, todo))  # map keeps the input order
    seconds = time.perf_counter() - start
    preds = np.array([a["top_k"][0]["index"] for a in answers])
    if args.transductive:
        raw = np.array([a["raw_probabilities"] for a in answers], dtype=np.float64)
        adjusted = raw / raw.sum(0, keepdims=True) ** meta["tau"]
        adjusted /= adjusted.sum(1, keepdims=True)
        preds = adjusted.argmax(1)
    _write(args.out, todo, answers, preds, meta["class_names"])
    summary = {
        "images": len(todo),
        "seconds": seconds,
        "images_per_s": len(todo) / seconds,
        "retries": client.retried,
        "mode": "transductive" if args.transductive else "stored",
    }
    labels = [item.label for item in todo]
    if all(label is not None for label in labels):
        summary.update(shot_accuracy(preds, np.array(labels), meta.get("train_class_counts")))
    return summary


def _write(out: Path, todo: list[Item], answers: list[dict], preds, names: list[str]) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as f:
        for item, answer, pred in zip(todo, answers, preds, strict=True):
            record = {
                "id": item.id,
                "label": item.label,
                "pred": int(pred),
                "pred_class": names[int(pred)],
                "top_k": answer["top_k"],
            }
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="gala-batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a shard set, an image folder (<class>/<image>) or a list file",
    )
    p.add_argument("--split", default="test", help="split of a shard set")
    p.add_argument("--root", type=Path, help="image root of a list file (default: its folder)")
    p.add_argument("--out", type=Path, required=True, help="predictions, JSON lines")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--model-name", default="gala")
    p.add_argument("--transductive", action="store_true", help="the paper's PN over the job")
    args = p.parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError, ServerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = {
        k: (f"{100 * v:.2f}%" if k in ("top1", "many", "medium", "few") and v is not None else v)
        for k, v in summary.items()
    }
    print(json.dumps(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
