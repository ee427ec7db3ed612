"""gala-batch: stream a shard set, an image folder or a list file through a gala-serve server.

    gala-batch --server http://127.0.0.1:8000 --input shards/x [--split test] --out preds.jsonl
               [--concurrency 8] [--transductive] [--top-k 5] [--grpc 127.0.0.1:8001]

Each image goes as it is (encoded JPEG/PNG/WebP) in the Open Inference Protocol's BYTES input
``image``, through a stock tritonclient: HTTP, or gRPC with ``--grpc``. So any server of that
protocol with the same input works, not only gala-serve. Images are read, sent and written as a
stream: at most a few per thread in memory, and 16 bytes an image kept for the accuracy, so the
memory does not grow with the job (the summary prints ``peak_rss_mib``). Predictions are written
in input order, one JSON object a line. Transient failures (connection errors, 429, 5xx,
UNAVAILABLE) are retried with backoff. An image the server refuses (400, 413; gRPC
INVALID_ARGUMENT, RESOURCE_EXHAUSTED), or that cannot be read, gets a record with its key and
the message instead of a prediction (``{"id", "label", "error", "status"}``), and the job goes
on. When labels are known, accuracy and many/medium/few shot accuracy (from the artifact's
training class counts, over the predicted images) are printed. ``--transductive`` applies the
paper's PN over the whole job instead of the stored scales: each image's raw probabilities go to
a file beside ``--out`` (K float32 an image, deleted at the end), each class's column is divided
by its total mass^tau, and the records are rewritten with those predictions.

Records go to ``.<out>.partial`` as they come, and it becomes ``--out`` when the job is done. A
job that stops (killed, or a failure that retries did not cure) leaves its records there, and
the same command with ``--resume`` goes on after the last whole record without sending those
items again; without ``--resume`` a job starts over.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenacity
from tritonclient.utils import InferenceServerException

from gala_serve.client import Client, ServerError
from gala_serve.protocol import top_classes
from gala_serve.records import Output, ResumeError, transductive_predictions
from gala_serve.sources import BadItem, Item, items


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


# Answers that condemn the item, not the job: the server refused this image (gRPC: the codes for
# a bad or oversized request). Anything else that is not retried stops the job.
ITEM_STATUS = {
    "400",
    "413",
    "415",
    "422",
    "StatusCode.INVALID_ARGUMENT",
    "StatusCode.RESOURCE_EXHAUSTED",
}


@dataclass
class Failed:
    """Why an item has no prediction: the server's message and status, or the local error."""

    message: str
    status: str | None = None


def _attempt(infer: Inferrer, item: Item) -> tuple[np.ndarray, np.ndarray] | Failed:
    try:
        image = item.load()
    except (BadItem, OSError) as err:
        return Failed(f"cannot read the image: {err}")
    try:
        return infer(image)
    except InferenceServerException as err:
        if str(err.status()) not in ITEM_STATUS:
            raise
        return Failed(err.message(), str(err.status()))


def _record(item: Item, result, names: list[str], k: int) -> tuple[dict, np.ndarray | None]:
    """An item's output line, and its raw probabilities when it has a prediction."""
    if isinstance(result, Failed):
        doc = {"id": item.id, "label": item.label, "error": result.message}
        return doc | {"status": result.status}, None
    adjusted, raw = result
    top = top_classes(adjusted, raw, names, k)
    doc = {"id": item.id, "label": item.label, "pred": top[0]["index"]}
    return doc | {"pred_class": top[0]["class"], "top_k": top}, raw


class JobStopped(RuntimeError):
    """The job stopped part way; its records so far are kept for ``--resume``."""


def run(args: argparse.Namespace) -> dict:
    client = Client(args.server, retries=args.retries)
    meta = client.json("GET", f"/v2/models/{args.model_name}")["parameters"]
    names = meta["class_names"]
    infer = Inferrer(args)
    k = max(1, min(args.top_k, len(names)))
    output = Output(args.out, len(names), args.transductive)
    start = time.perf_counter()
    try:
        todo = iter(items(args.input, args.split, names, args.root))
        work = lambda item: _attempt(infer, item)  # noqa: E731
        with output.writing(todo, args.resume):
            for item, result in _ordered(work, todo, args.concurrency):
                output.write(*_record(item, result, names, k))
        if not output.written:
            raise ValueError(f"{args.input}: no images")
        seconds = time.perf_counter() - start
        preds = output.finish(meta["tau"], names)
    except ResumeError:
        raise  # the records are not this input's: left for the user to look at
    except BaseException as err:
        if output.abandon() and isinstance(err, Exception):
            raise JobStopped(
                f"{err}; the {output.written} records written so far are in {output.path}: "
                "the same command with --resume goes on from there"
            ) from err
        raise
    sent = output.written - output.resumed
    summary = {
        "images": output.written,
        "errors": output.errors,
        "resumed": output.resumed,
        "seconds": seconds,
        "images_per_s": sent / seconds,
        "retries": infer.retried + client.retried,
        "mode": "transductive" if args.transductive else "stored",
        "protocol": "grpc" if args.grpc else "http",
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    labels = np.frombuffer(output.labels, np.int64)
    if len(labels) and (labels >= 0).all():
        summary.update(shot_accuracy(preds, labels, meta.get("train_class_counts")))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """gala-batch's arguments (also what :func:`run` takes from a caller in Python)."""
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the records a stopped run of the same job left, sending none again",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (JobStopped, ValueError, OSError, ServerError, InferenceServerException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; --resume goes on from the records written so far", file=sys.stderr)
        return 130
    if summary["errors"]:
        print(
            f"warning: {summary['errors']} of {summary['images']} images have no prediction; "
            f"their records in {args.out} say why",
            file=sys.stderr,
        )
    shown = {
        k: (f"{100 * v:.2f}%" if k in ("top1", "many", "medium", "few") and v is not None else v)
        for k, v in summary.items()
    }
    print(json.dumps(shown))
    return 0


# transductive_predictions lives in gala_serve.records (Output.finish applies it); named here too,
# with the job, for callers of the job's Python API.
__all__ = ["JobStopped", "main", "parse_args", "run", "shot_accuracy", "transductive_predictions"]


if __name__ == "__main__":
    sys.exit(main())
