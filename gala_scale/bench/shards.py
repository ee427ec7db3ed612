"""Benchmark: shard build throughput, one process vs all cores, on the same raw dataset.

    python -m gala_scale.bench shards --kind cifar --root DIR [--imbalance-factor 100]

Each candidate builds the same set into its own temporary folder (nothing is reused between
them); images/s counts every sample written or checked and excluded. Runs alternate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from gala_scale.bench.common import machine
from gala_scale.shards.__main__ import main as shards_main
from gala_scale.shards.manifest import load_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", default="cifar", choices=("cifar", "imagefolder", "synthetic"))
    parser.add_argument("--root", type=Path, help="raw dataset (not needed for synthetic)")
    parser.add_argument("--imbalance-factor", type=float)
    parser.add_argument("--repeats", type=int, default=3, help="builds per candidate")


def _build_once(args: argparse.Namespace, workers: int, out: Path) -> tuple[float, int]:
    argv = ["build", args.kind, "--out", str(out), "--workers", str(workers)]
    if args.root is not None:
        argv += ["--root", str(args.root)]
    if args.imbalance_factor:
        argv += ["--imbalance-factor", str(args.imbalance_factor)]
    start = time.perf_counter()
    if shards_main(argv) != 0:
        raise RuntimeError(f"build failed: {' '.join(argv)}")
    seconds = time.perf_counter() - start
    manifest = load_manifest(out)
    images = sum(s["num_samples"] for s in manifest["splits"].values()) + len(manifest["excluded"])
    return seconds, images


def run(args: argparse.Namespace) -> dict:
    cores = os.cpu_count() or 1
    candidates = {"1_process": 1, f"{cores}_processes": cores}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    images = 0
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for name, workers in candidates.items():
                seconds, images = _build_once(args, workers, Path(tmp) / f"{name}-{round_}")
                times[name].append(seconds)
                print(f"{name}: {images} images in {seconds:.2f} s", flush=True)
    medians = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    rates = {f"{name}_images_per_s": images / s for name, s in medians.items()}
    serial, parallel = medians.values()
    return {
        "benchmark": "shards",
        "machine": machine(),
        "kind": args.kind,
        "images": images,
        **{f"{name}_s": s for name, s in medians.items()},
        **rates,
        "speedup": serial / parallel,
    }
