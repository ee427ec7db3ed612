"""gala-batch's records on disk: written as they come to ``.<out>.partial`` (resumable), the
transductive PN over the whole job, and ``--out`` in place when done."""

from __future__ import annotations

import array
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

from gala_serve.sources import Item


class ResumeError(ValueError):
    """``--resume`` found records that do not belong to this job's input."""


class Output:
    """The job's records so far, in input order: ``.<out>.partial`` (JSON lines) and, with
    ``--transductive``, ``.<out>.partial.raw`` (K float32 a predicted item). Each record is
    flushed as it is written, its raw row first, so a job killed at any point leaves whole
    records (and at least their raw rows) to resume from. Renamed to ``--out`` when done.

    Memory: 16 bytes a predicted item (label and prediction, for the accuracy)."""

    def __init__(self, out: Path, k: int, transductive: bool) -> None:
        self.out, self.k = out, k
        self.path = out.with_name(f".{out.name}.partial")
        self.raw_path = self.path.with_name(self.path.name + ".raw")
        self.transductive = transductive
        self.labels, self.preds = array.array("q"), array.array("q")
        self.written = self.errors = self.resumed = 0
        self.file = self.raws = None

    @contextlib.contextmanager
    def writing(self, todo: Iterator[Item], resume: bool) -> Iterator[None]:
        """Open for :meth:`write`: after the records of an earlier run when ``resume``, taking
        the items they hold from ``todo`` (read, never sent); else from nothing."""
        if resume and self.path.is_file():
            self._reload(todo)
        else:
            if self.path.is_file():
                print(
                    f"note: starting over; --resume would go on from {self.path}", file=sys.stderr
                )
            self.path.write_bytes(b"")
            self.raw_path.write_bytes(b"")
        raws = self.raw_path if self.transductive else os.devnull
        with open(self.path, "ab") as self.file, open(raws, "ab") as self.raws:
            yield

    def _reload(self, todo: Iterator[Item]) -> None:
        end = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # the last record, cut off by the stop: sent again
                record = orjson.loads(line)
                item = next(todo, None)
                if item is None or item.id != record.get("id"):
                    raise ResumeError(
                        f"{self.path}: record {self.written + 1} is {record.get('id')!r}, the "
                        f"input's item is {item and item.id!r}: the input has changed; run "
                        "again without --resume"
                    )
                self._count(record)
                end += len(line)
        os.truncate(self.path, end)
        if self.transductive:
            size = len(self.preds) * self.k * 4
            have = self.raw_path.stat().st_size if self.raw_path.is_file() else 0
            if have < size:
                raise ResumeError(
                    f"{self.raw_path}: {have} bytes, fewer than the {len(self.preds)} "
                    f"predictions in {self.path} need: run again without --resume"
                )
            os.truncate(self.raw_path, size)
        self.resumed = self.written

    def _count(self, record: dict) -> None:
        self.written += 1
        if "error" in record:
            self.errors += 1
            return
        self.labels.append(-1 if record["label"] is None else record["label"])
        self.preds.append(record["pred"])

    def write(self, record: dict, raw: np.ndarray | None) -> None:
        if raw is not None and self.transductive:
            self.raws.write(np.asarray(raw, np.float32).tobytes())
            self.raws.flush()
        self.file.write(orjson.dumps(record) + b"\n")
        self.file.flush()
        self._count(record)

    def finish(self, tau: float, names: list[str]) -> np.ndarray:
        """The predictions (transductive ones rewritten into the records); ``--out`` in place,
        nothing else left."""
        preds = np.frombuffer(self.preds, np.int64)
        if self.transductive and len(preds):
            raw = np.memmap(self.raw_path, np.float32, "r", shape=(len(preds), self.k))
            preds = transductive_predictions(raw, tau)
            del raw
            _rewrite(self.path, preds, names)
        self.raw_path.unlink(missing_ok=True)
        os.replace(self.path, self.out)
        return preds

    def abandon(self) -> bool:
        """After a stop: keep the records for ``--resume`` if there are any (True), else leave
        nothing behind."""
        if self.written:
            return True
        self.path.unlink(missing_ok=True)
        self.raw_path.unlink(missing_ok=True)
        return False


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
    """Put the transductive predictions into the records that have one, a line at a time."""
    tmp = path.with_name(path.name + ".2")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            done = 0
            for line in src:
                record = orjson.loads(line)
                if "error" not in record:
                    pred = int(preds[done])
                    record["pred"], record["pred_class"] = pred, names[pred]
                    done += 1
                dst.write(orjson.dumps(record) + b"\n")
        if done != len(preds):
            raise ValueError(f"{path}: {done} predicted records for {len(preds)} predictions")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
