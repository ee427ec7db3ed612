"""gala-batch: stream a shard set, an image folder or a list file through a gala-serve server.

    gala-batch --server http://127.0.0.1:8000 --input shards/x [--split test] --out preds.jsonl
               [--concurrency 8] [--transductive] [--top-k 5] [--grpc 127.0.0.1:8001]

Each image goes as it is (encoded JPEG/PNG/WebP) in the Open Inference Protocol's BYTES input
``image``, through a stock tritonclient: HTTP, or gRPC with ``--grpc``. So any server of that
protocol with the same input works, not only gala-serve. Images are read, sent and written as a
stream: at most a few per thread in memory, and 16 bytes an image kept for the accuracy, so the
memory does not grow with the job (the summary prints ``peak_rss_mib``). Predictions are written
in input order, one JSON object a line. Transient failures (connection errors, 429, 5xx,
UNAVAILABLE) are retried with backoff. When labels are known, accuracy and many/medium/few shot
accuracy (from the artifact's training class counts) are printed. ``--transductive`` applies the
paper's PN over the whole job instead of the stored scales: each image's raw probabilities go to
a file beside ``--out`` (K float32 an image, deleted at the end), each class's column is divided
by its total mass^tau, and the records are rewritten with those predictions.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import resource
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import tenacity
from tritonclient.utils import InferenceServerException

from gala_serve.client import Client, ServerError
from gala_serve.protocol import top_classes

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


RETRY_STATUS = {"429", "500", "502", "503", "504", "StatusCode.UNAVAILABLE"}


def _transient(err: BaseException) -> bool:
    if isinstance(err, InferenceServerException):
        return str(err.status()) in RETRY_STATUS
    return isinstance(err, OSError)


class Inferrer:
    """One tritonclient a thread (the HTTP one is not thread-safe), retries by tenacity."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.grpc:
            import tritonclient.grpc as tc

            self.url = args.grpc
        else:
            import tritonclient.http as tc

            self.url = args.server.split("://", 1)[-1]
        self.tc, self.model, self.local = tc, args.model_name, threading.local()
        self.retried = 0
        self.retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_transient),
            stop=tenacity.stop_after_attempt(args.retries + 1),
            wait=tenacity.wait_exponential(multiplier=0.2, max=10),
            before_sleep=self._count,
            reraise=True,
        )

    def _count(self, state) -> None:
        self.retried += 1

    def __call__(self, image: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(re-balanced, raw) probabilities of one encoded image."""
        return self.retrying(self._once, image)

    def _once(self, image: bytes) -> tuple[np.ndarray, np.ndarray]:
        tc = self.tc
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = tc.InferenceServerClient(self.url)
        tensor = tc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=object))
        outputs = [tc.InferRequestedOutput(n) for n in ("probabilities", "raw_probabilities")]
        if tc.__name__.endswith("http"):
            outputs = [tc.InferRequestedOutput(o.name(), binary_data=True) for o in outputs]
        try:
            result = client.infer(self.model, [tensor], outputs=outputs)
        except OSError:
            self.local.client = None  # a broken connection: a new client for the retry
            raise
        return result.as_numpy("probabilities")[0], result.as_numpy("raw_probabilities")[0]


def _ordered(fn: Callable, todo: Iterable[Item], concurrency: int) -> Iterator[tuple[Item, Any]]:
    """(item, fn(item)) in input order, at most a few items a thread in flight."""
    window: deque = deque()
    with ThreadPoolExecutor(concurrency) as pool:
        for item in todo:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 4 * concurrency:
                item, future = window.popleft()
                yield item, future.result()
        while window:
            item, future = window.popleft()
            yield item, future.result()


def run(args: argparse.Namespace) -> dict:
    client = Client(args.server, retries=args.retries)
    meta = client.json("GET", f"/v2/models/{args.model_name}")["parameters"]
    names = meta["class_names"]
    infer = Inferrer(args)
    k = max(1, min(args.top_k, len(names)))
    # 8 bytes an image for the accuracy at the end; -1 is an image without a label.
    labels, preds = array.array("q"), array.array("q")
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    raw_path = tmp.with_name(tmp.name + ".raw")
    start = time.perf_counter()
    with (
        open(tmp, "w") as f,
        open(raw_path, "wb") if args.transductive else contextlib.nullcontext() as raws,
    ):
        for item, (adjusted, raw) in _ordered(
            lambda item: infer(item.load()),
            items(args.input, args.split, names, args.root),
            args.concurrency,
        ):
            labels.append(-1 if item.label is None else item.label)
            top = top_classes(adjusted, raw, names, k)
            preds.append(top[0]["index"])
            if raws:
                raws.write(np.asarray(raw, np.float32).tobytes())
            record = {
                "id": item.id,
                "label": item.label,
                "pred": top[0]["index"],
                "pred_class": top[0]["class"],
                "top_k": top,
            }
            f.write(orjson.dumps(record).decode() + "\n")
    seconds = time.perf_counter() - start
    count = len(preds)
    if not count:
        tmp.unlink()
        raw_path.unlink(missing_ok=True)
        raise ValueError(f"{args.input}: no images")
    preds = np.frombuffer(preds, np.int64)
    if args.transductive:
        raw = np.memmap(raw_path, np.float32, "r", shape=(count, len(names)))
        preds = transductive_predictions(raw, meta["tau"])
        del raw
        raw_path.unlink()
        _rewrite(tmp, preds, names)
    os.replace(tmp, args.out)
    summary = {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "retries": infer.retried + client.retried,
        "mode": "transductive" if args.transductive else "stored",
        "protocol": "grpc" if args.grpc else "http",
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    labels = np.frombuffer(labels, np.int64)
    if (labels >= 0).all():
        summary.update(shot_accuracy(preds, labels, meta.get("train_class_counts")))
    return summary


def transductive_predictions(raw: np.ndarray, tau: float, rows: int = 4096) -> np.ndarray:
    """The paper's PN over the job: each class's column divided by its total mass^tau, argmax.

    ``raw`` (images, K) is read ``rows`` at a time, so a memory map of it on disk is never
    loaded whole: iNat's val split is 24,426 x 8,142 floats, 0.8 GB.
    """
    mass = np.zeros(raw.shape[1], np.float64)
    for i in range(0, len(raw), rows):
        mass += raw[i : i + rows].sum(0, dtype=np.float64)
    divisor = mass**tau
    return np.concatenate(
        [(raw[i : i + rows] / divisor).argmax(1) for i in range(0, len(raw), rows)]
    )


def _rewrite(path: Path, preds: np.ndarray, names: list[str]) -> None:
    """Put the transductive predictions into the written records, a line at a time."""
    tmp = path.with_name(path.name + ".2")
    with open(path) as src, open(tmp, "w") as dst:
        for line, pred in zip(src, preds, strict=True):
            record = orjson.loads(line)
            record["pred"], record["pred_class"] = int(pred), names[int(pred)]
            dst.write(orjson.dumps(record).decode() + "\n")
    os.replace(tmp, path)


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
    p.add_argument("--grpc", metavar="HOST:PORT", help="infer over gRPC at this address")
    p.add_argument("--transductive", action="store_true", help="the paper's PN over the job")
    args = p.parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError, ServerError, InferenceServerException) as err:
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
