"""Benchmark: shard build throughput, one process vs all cores, on the same raw dataset.

    python -m gala_scale.bench shards --kind cifar --root DIR [--imbalance-factor 100]
    python -m gala_scale.bench shards --like inat2018 --root RAW   # raw data of `shards synth`

Each candidate builds the same set into its own temporary folder (nothing is reused between
them); images/s counts every sample written or checked and excluded. Runs alternate. The DALI
indexes are written inside the build (a shard's index right after its tar); ``index_s`` times
writing them all again, in one process, for the last set built.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from gala_scale.bench.common import machine
from gala_scale.shards import like, tario
from gala_scale.shards.__main__ import main as shards_main
from gala_scale.shards.manifest import load_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", default="cifar", choices=("cifar", "imagefolder", "synthetic"))
    parser.add_argument("--root", type=Path, help="raw dataset (not needed for synthetic)")
    parser.add_argument("--imbalance-factor", type=float)
    parser.add_argument(
        "--like",
        choices=("inat2018", "imagenet_lt", "places_lt"),
        help="build what `shards synth --like` wrote at --root with the real builder",
    )
    parser.add_argument("--repeats", type=int, default=3, help="builds per candidate")


def _build_once(args: argparse.Namespace, workers: int, out: Path) -> tuple[float, int]:
    if args.like:
        argv = [*like.build_command(args.like, args.root, out), "--workers", str(workers)]
    else:
        argv = ["build", args.kind, "--out", str(out), "--workers", str(workers)]
    if args.root is not None and not args.like:
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
                last = Path(tmp) / f"{name}-{round_}"
        start = time.perf_counter()
        for tar in sorted(last.glob("**/*.tar")):
            tario.write_index(tar, tar.with_suffix(".idx"))
        index_s = time.perf_counter() - start
    medians = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    rates = {f"{name}_images_per_s": images / s for name, s in medians.items()}
    serial, parallel = medians.values()
    return {
        "benchmark": "shards",
        "machine": machine(),
        "kind": args.like or args.kind,
        "index_s": index_s,
        "images": images,
        **{f"{name}_s": s for name, s in medians.items()},
        **rates,
        "speedup": serial / parallel,
    }
