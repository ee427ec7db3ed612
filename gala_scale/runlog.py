"""What a run writes besides checkpoints: metrics (JSON lines, and the tracker the config names
through Accelerate's tracker API: TensorBoard by default), ledger history."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gala_scale import publish

METRICS = "metrics.jsonl"
TRACKER_PROJECT = "tb"  # TensorBoard writes <run_dir>/tb; MLflow names its experiment so
# One raw float64 file a name, a (K,) row appended an epoch (so an epoch costs K x 8 bytes a name,
# not the whole history again), and a JSON file with K and the names.
LEDGER = "ledger_history"
LEDGER_META = "meta.json"


def _epoch(line: str) -> int:
    """A metrics line's epoch; a line a kill cut short counts as past every epoch (dropped)."""
    try:
        return json.loads(line).get("epoch", -1)
    except ValueError:
        return 2**31


class RunLog:
    """Main-process writer of ``metrics.jsonl`` and ``ledger_history/``; every number of a record
    also goes to ``accelerator``'s trackers (``train.tracker``), as ``<type>/<key>`` at the
    record's epoch. ``accelerator`` None: the files only (reading, tests)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_epoch: int, accelerator=None) -> None:
        self.run_dir, self.enabled, self.accelerator = Path(run_dir), enabled, accelerator
        if accelerator is not None:
            accelerator.init_trackers(TRACKER_PROJECT)  # a collective of sorts: every rank
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_epoch)

    def _truncate(self, epoch: int) -> None:
        """Forget what an interrupted run logged for epochs it will now run again."""
        path = self.run_dir / METRICS
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _epoch(line) < epoch]
            publish.write_text(path, "".join(line + "\n" for line in kept))
        meta = self._ledger_meta()
        for name in meta["names"] if meta else []:
            path = self.run_dir / LEDGER / f"{name}.f64"
            if path.exists():  # (absent: a kill between the meta and the first row)
                os.truncate(path, min(path.stat().st_size, epoch * meta["num_classes"] * 8))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.accelerator is not None:
            numbers = {
                f"{record['type']}/{key}": value
                for key, value in record.items()
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "epoch"
            }
            self.accelerator.log(numbers, step=record.get("epoch", 0))

    def records(self) -> list[dict]:
        """Every whole record of ``metrics.jsonl`` (a line a kill cut short is left out)."""
        path = self.run_dir / METRICS
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if _epoch(line) < 2**31]

    def _ledger_meta(self) -> dict | None:
        path = self.run_dir / LEDGER / LEDGER_META
        return json.loads(path.read_text()) if path.is_file() else None

    def ledger_history(self) -> dict[str, np.ndarray] | None:
        """The ledger at each epoch's end, (epochs, K) a name: ``theta`` and ``phi``, and with
        ``loss.ledger: sum_of_sums`` also ``s_theta`` and ``s_phi``, what the logits used.
        Epochs whose row is not in every file (a run stopped while appending) are left out."""
        meta = self._ledger_meta()
        if meta is None:
            return None
        k, folder = meta["num_classes"], self.run_dir / LEDGER
        rows = {
            name: np.fromfile(path, dtype="<f8") if path.exists() else np.zeros(0)
            for name, path in ((n, folder / f"{n}.f64") for n in meta["names"])
        }
        epochs = min(len(values) // k for values in rows.values())
        return {name: values[: epochs * k].reshape(epochs, k) for name, values in rows.items()}

    def append_ledger(self, ledger: dict[str, np.ndarray]) -> None:
        """One epoch's ledger (a (K,) array a name, the names of every epoch the same)."""
        if not self.enabled:
            return
        folder = self.run_dir / LEDGER
        meta = {"num_classes": len(next(iter(ledger.values()))), "names": sorted(ledger)}
        if self._ledger_meta() != meta:  # the first epoch (or another ledger): start afresh
            folder.mkdir(exist_ok=True)
            for stale in folder.glob("*.f64"):
                stale.unlink()
            publish.write_text(folder / LEDGER_META, json.dumps(meta))
        for name in meta["names"]:
            with open(folder / f"{name}.f64", "ab") as f:
                f.write(np.ascontiguousarray(ledger[name], dtype="<f8").tobytes())

    def close(self) -> None:
        """Nothing to close: each record is appended whole, each tracker flushes its own, and
        ``accelerator.end_training()`` (the trainer's last call) finishes the trackers."""
