"""Launching real training runs from tests: one process, accelerate, DeepSpeed, two machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from gala_scale.launch import train_command

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Tests that expect the CPU hide the GPUs, so the default suite passes on a GPU machine too;
# GPU-marked tests run with GPU_ENV.
ENV = {**GPU_ENV, "CUDA_VISIBLE_DEVICES": ""}


def debug_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "debug.yaml"),
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        "data.batch_size=32",
        "data.eval_batch_size=40",
        "train.keep_checkpoints=10",
        *extra,
    ]


def run_module(module: str, *args: str, timeout: int = 300, env: dict | None = None):
    """``python -m module args`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
    )


def run_single(args: list[str], timeout: int = 300, env: dict | None = None):
    return run_module("gala_scale.train", *args, timeout=timeout, env=env)


def accelerate_cmd(
    port: int,
    *,
    processes: int = 2,
    deepspeed: str | None = None,
    machines: int = 1,
    machine_rank: int = 0,
    bf16: bool = False,
    script: Path | None = None,
) -> list[str]:
    """The launch of the trainer (or of ``script``, which runs it) on the CPU, as every tool
    launches it (gala_scale.launch: ``accelerate launch`` from 2 processes or with DeepSpeed);
    ``deepspeed`` names a configs/deepspeed JSON."""
    return train_command(
        processes,
        port,
        str(ROOT / "configs" / "deepspeed" / f"{deepspeed}.json") if deepspeed else None,
        "bf16" if bf16 else "no",
        machines=machines,
        machine_rank=machine_rank,
        script=str(script) if script else None,
    )


def run_accelerate(args: list[str], port: int, timeout: int = 400, **kw):
    return subprocess.run(
        [*accelerate_cmd(port, **kw), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]


def ledger(run_dir: Path, which: str = "final") -> dict:
    return load_file(run_dir / which / "ledger.safetensors")


def weights(run_dir: Path, which: str = "final") -> dict:
    return load_file(run_dir / which / "model.safetensors")


def train_losses(run_dir: Path) -> list[float]:
    """The logged training loss of each epoch."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def explain(proc) -> str:
    out, err = proc.stdout[-3000:], proc.stderr[-6000:]
    return f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def onnx_test_top1(artifact: Path, shards: Path) -> tuple[float, int]:
    """Top-1 of an exported artifact's ``model.onnx`` (ONNX Runtime, the server's preprocessing)
    on a shard set's test split, and the number of images."""
    import io

    import numpy as np
    import onnxruntime as ort
    from gala_serve import preprocess
    from PIL import Image

    from gala_scale.shards import tario

    pre = json.loads((artifact / "artifact.json").read_text())["preprocess"]
    manifest = json.loads((shards / "manifest.json").read_text())
    x, labels = [], []
    for shard in manifest["splits"]["test"]["shards"]:
        for _, files in tario.iter_tar(shards / shard["file"]):
            x.append(preprocess.eval_array(Image.open(io.BytesIO(files["jpg"])), pre))
            labels.append(int(files["cls"]))
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    raw = dict(zip(names, session.run(None, {"input": np.stack(x)}), strict=True))
    return float((raw["raw_probabilities"].argmax(1) == np.array(labels)).mean()), len(labels)
