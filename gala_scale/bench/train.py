"""Benchmark: training throughput and memory, CE vs GALA and 1 vs 2 processes, on CPU or GPU.

    python -m gala_scale.bench train --shards DIR [--model resnet32] [--epochs 3]
    python -m gala_scale.bench train --shards DIR --processes 2 --deepspeed zero2 --precision bf16

Each candidate is a real run of the trainer (``python -m gala_scale.train`` or
``accelerate launch`` with 2 processes) on the same shards; images/s is the median over its
epochs after the first (which includes start-up), counted over all processes; peak RSS is per
process. Candidates run one after another, then again in reverse order, and the medians of both
passes are reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from gala_scale.bench.common import machine
from gala_scale.data import LOADERS
from gala_scale.launch import train_command

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True)
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--preset", default="cifar")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2, help="times each candidate runs")
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--loader", default="auto", choices=LOADERS, help="data.loader")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        help="process counts for GALA (default 1 2; 1 alone with fewer than 2 GPUs)",
    )
    parser.add_argument(
        "--deepspeed",
        nargs="*",
        default=[],
        help="also GALA with the largest process count under these configs/deepspeed/*.json "
        "(e.g. zero1 zero2), beside DDP",
    )
    parser.add_argument("--precision", default="auto", help="train.precision of every candidate")


def _run(
    args: argparse.Namespace, loss: str, processes: int, run_dir: Path, deepspeed: str | None
) -> dict:
    ds_file = str(ROOT / "configs" / "deepspeed" / f"{deepspeed}.json") if deepspeed else None
    cmd = [
        *train_command(processes, args.port, ds_file),
        "--config",
        str(ROOT / "configs" / "debug.yaml"),
        f"data.shards={args.shards}",
        f"run_dir={run_dir}",
        f"model.name={args.model}",
        f"data.preset={args.preset}",
        f"loss.name={loss}",
        f"train.epochs={args.epochs}",
        f"data.batch_size={args.batch_size}",
        f"data.loader={args.loader}",
        "data.val_split=",
        "data.test_split=",
        "train.eval_every=0",
        f"train.precision={args.precision}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(x)["images_per_s"] for x in lines if json.loads(x)["type"] == "train"]
    ranks = [json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank*.json")]
    shutil.rmtree(run_dir)
    return {
        "images_per_s": statistics.median(rates[1:] or rates),
        "peak_rss_mib_per_process": max(r["peak_rss_mib"] for r in ranks),
        **(
            {"peak_gpu_mib_per_process": max(r["peak_gpu_mib"] for r in ranks)}
            if "peak_gpu_mib" in ranks[0]
            else {}
        ),
    }


def _process_counts(asked: list[int] | None) -> list[int]:
    if asked:
        return sorted(set(asked) | {1})
    gpus = torch.cuda.device_count()
    # NCCL refuses two ranks on one GPU; on a CPU machine 2 processes share the cores (gloo).
    return [1] if gpus == 1 else [1, 2]


def run(args: argparse.Namespace) -> dict:
    counts = _process_counts(args.processes)
    candidates = [("ce", 1, None)] + [("gala", n, None) for n in counts]
    candidates += [("gala", counts[-1], ds) for ds in args.deepspeed]

    def label(loss: str, n: int, ds: str | None) -> str:
        return f"{loss}_{n}proc" + (f"_{ds}" if ds else "")

    samples: dict[str, list[dict]] = {label(*c): [] for c in candidates}
    with tempfile.TemporaryDirectory() as tmp:
        for pass_ in range(args.passes):
            for loss, n, ds in candidates if pass_ % 2 == 0 else candidates[::-1]:
                name = label(loss, n, ds)
                result = _run(args, loss, n, Path(tmp) / f"{name}-{pass_}", ds)
                samples[name].append(result)
                print(f"{name}: {result}", flush=True)
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in samples.items()
    }
    rate = {name: s["images_per_s"] for name, s in summary.items()}
    return {
        "benchmark": "train",
        "machine": machine(),
        "model": args.model,
        "shards": args.shards,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        **summary,
        "gala_over_ce_images_per_s": rate["gala_1proc"] / rate["ce_1proc"],
        **{
            f"{n}_over_1_process_images_per_s": rate[f"gala_{n}proc"] / rate["gala_1proc"]
            for n in counts
            if n > 1
        },
        **{
            f"{ds}_over_ddp_images_per_s": rate[label("gala", counts[-1], ds)]
            / rate[label("gala", counts[-1], None)]
            for ds in args.deepspeed
        },
    }
