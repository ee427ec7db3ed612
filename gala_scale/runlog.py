"""What a run writes besides checkpoints: metrics (JSON lines + TensorBoard), ledger history."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = "metrics.jsonl"
LEDGER = "ledger_history.npz"


class RunLog:
    """Main-process writer of ``metrics.jsonl``, ``tb/`` and ``ledger_history.npz``."""

    def __init__(self, run_dir: Path, enabled: bool, resume_epoch: int) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_epoch)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def _truncate(self, epoch: int) -> None:
        """Forget what an interrupted run logged for epochs it will now run again."""
        path = self.run_dir / METRICS
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line).get("epoch", -1) < epoch
            ]
            path.write_text("".join(line + "\n" for line in kept))
        history = self.ledger_history()
        if history is not None:
            self._write_ledger({name: values[:epoch] for name, values in history.items()})

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = record.get("epoch", 0)
        for key, value in record.items():
            if isinstance(value, int | float) and key != "epoch" and value is not None:
                self.writer.add_scalar(f"{record['type']}/{key}", value, step)
        self.writer.flush()

    def ledger_history(self) -> dict[str, np.ndarray] | None:
        """The ledger at each epoch's end, (epochs, K) a name: ``theta`` and ``phi``, and with
        ``loss.ledger: sum_of_sums`` also ``s_theta`` and ``s_phi``, what the logits used."""
        path = self.run_dir / LEDGER
        if not path.exists():
            return None
        with np.load(path) as data:
            return {name: data[name] for name in data.files}

    def _write_ledger(self, history: dict[str, np.ndarray]) -> None:
        tmp = self.run_dir / f".{LEDGER}.tmp.npz"
        np.savez(tmp, **history)
        tmp.replace(self.run_dir / LEDGER)

    def append_ledger(self, ledger: dict[str, np.ndarray]) -> None:
        """One epoch's ledger (a (K,) array a name, the names of every epoch the same)."""
        if not self.enabled:
            return
        history = self.ledger_history()
        if history is None or set(history) != set(ledger):
            history = {name: values[None] for name, values in ledger.items()}
        else:
            history = {name: np.vstack([history[name], ledger[name][None]]) for name in ledger}
        self._write_ledger(history)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
