"""Benchmark: the trainer's step (forward, GALA loss, backward, optimizer) under each launcher.

    python -m gala_scale.bench step --model resnet50 --image-size 224 --batch-size 128 \\
        --launchers ddp zero2 --precision bf16 --steps 20

Each launcher runs the trainer's own parts (``train.build_parts`` and ``engine.train_one_epoch``,
so the same precision handling, recipe options and guard) in a fresh process started the way the
trainer is (``ddp``: Accelerate's data parallelism, which with one process is a plain
Accelerate process; ``zero1``/``zero2``: ``configs/deepspeed/<name>.json``), on one fixed
batch of random images already on the device: the data path is left out, so this measures the
model step alone. ``--warmup`` steps come first and are not timed (cuDNN autotuning, allocator
growth); the timed steps end with the guard's sync. Candidates run in order, then in reverse
order, for ``--passes`` runs; medians are reported, with images/s counted over all processes
and peak memory per process (CUDA allocator peak on a GPU, resident set size on a CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gala_scale.bench.common import machine
from gala_scale.system import peak_rss_mib

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128, help="global, over all processes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--launchers", nargs="+", default=["ddp", "zero2"])
    parser.add_argument("--precision", default="auto", help="train.precision")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--passes", type=int, default=1, help="times each launcher runs")
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def _overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.name={args.model}",
        f"train.precision={args.precision}",
        f"data.batch_size={args.batch_size}",
        *args.set,
    ]


def _run(args: argparse.Namespace, launcher: str) -> dict:
    from gala_scale.launch import train_command

    ds = None if launcher == "ddp" else str(ROOT / "configs" / "deepspeed" / f"{launcher}.json")
    if ds is not None and not Path(ds).is_file():
        raise SystemExit(f"--launchers: {ds} does not exist")
    with tempfile.TemporaryDirectory(prefix="gala-step-") as records:
        cmd = [
            *train_command(args.processes, args.port, ds, module="gala_scale.bench.step"),
            f"--out={records}",
            f"--image-size={args.image_size}",
            f"--classes={args.classes}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            *_overrides(args),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        files = sorted(Path(records).glob("rank*.json"))
        if proc.returncode != 0 or len(files) != args.processes:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(f.read_text()) for f in files]
    seconds = max(r["seconds"] for r in ranks)  # the slowest rank sets the pace
    out = {
        "images_per_s": sum(r["samples"] for r in ranks) / seconds,
        "peak_rss_mib_per_process": max(r["peak_rss_mib"] for r in ranks),
        "loss": ranks[0]["loss"],
    }
    if "peak_gpu_mib" in ranks[0]:
        out["peak_gpu_mib_per_process"] = max(r["peak_gpu_mib"] for r in ranks)
    return out


def run(args: argparse.Namespace) -> dict:
    samples: dict[str, list[dict]] = {name: [] for name in args.launchers}
    for pass_ in range(args.passes):
        for name in args.launchers if pass_ % 2 == 0 else args.launchers[::-1]:
            samples[name].append(_run(args, name))
            print(f"{name}: {samples[name][-1]}", flush=True)
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in samples.items()
    }
    first = args.launchers[0]
    return {
        "benchmark": "step",
        "machine": machine(),
        **{k: getattr(args, k) for k in ("model", "image_size", "batch_size", "steps")},
        "precision": args.precision,
        "processes": args.processes,
        **summary,
        **{
            f"{name}_over_{first}_images_per_s": summary[name]["images_per_s"]
            / summary[first]["images_per_s"]
            for name in args.launchers[1:]
        },
    }


def worker(argv: list[str]) -> None:
    """One process of one candidate: build the trainer's parts, time its step, write its record."""
    from gala_scale import dist, recipe
    from gala_scale.config import load_config
    from gala_scale.engine import train_one_epoch
    from gala_scale.runtime import Guard, make_accelerator
    from gala_scale.train import build_parts

    p = argparse.ArgumentParser(prog="gala_scale.bench.step")
    for name in ("image-size", "classes", "steps", "warmup"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(ROOT / "configs" / "debug.yaml", args.overrides)
    acc = make_accelerator(cfg)
    cuda = acc.device.type == "cuda"
    recipe.set_backends(cfg, cuda)
    per_rank = cfg.data.batch_size // acc.num_processes
    parts = build_parts(cfg, acc, args.classes, [1] * args.classes, args.warmup + args.steps)
    images = torch.randn(per_rank, 3, args.image_size, args.image_size, device=acc.device)
    if recipe.channels_last(cfg, cuda):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(args.classes, (per_rank,), device=acc.device)
    guard = Guard()

    def steps(first: int, count: int):
        batches = ((images, labels) for _ in range(count))
        return train_one_epoch(
            parts.model,
            parts.criterion,
            parts.optimizer,
            parts.scheduler,
            batches,
            acc,
            guard,
            first_step=first,
            sync_every=cfg.train.sync_every_steps,
            check_every=count,
            ema=parts.ema,
        )

    steps(0, args.warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats(acc.device)
    start = time.perf_counter()
    result = steps(args.warmup, args.steps)  # ends with the guard's sync
    record = {
        "seconds": time.perf_counter() - start,
        "samples": result.samples,
        "loss": result.loss,
        "peak_rss_mib": peak_rss_mib(),
    }
    if cuda:
        record["peak_gpu_mib"] = torch.cuda.max_memory_allocated(acc.device) / 2**20
    (args.out / f"rank{acc.process_index}.json").write_text(json.dumps(record))
    acc.end_training()
    dist.leave(0, acc.num_processes)


if __name__ == "__main__":
    worker(sys.argv[1:])
