"""Benchmark: DALI vs the webdataset + torch fallback on the same shards and preset.

    python -m gala_scale.bench loader --shards DIR --preset cifar|imagenet [--batches 60]

Each measurement runs in a fresh process (so each loader's peak memory is its own), reading
training batches from the train split with the machine's cores; runs alternate between the two
loaders and the medians are reported. Peak RSS is the measuring process's; for the fallback the
largest DataLoader worker's is reported too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

from gala_scale.bench.common import machine
from gala_scale.data import create_loader
from gala_scale.system import peak_rss_mib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="a shard set folder")
    parser.add_argument("--preset", required=True, choices=("cifar", "imagenet"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60, help="timed batches a run")
    parser.add_argument("--repeats", type=int, default=3, help="runs a loader")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads/workers")


def _measure(kind: str, args: argparse.Namespace, queue) -> None:
    loader = create_loader(
        args.shards,
        args.split,
        preset=args.preset,
        kind=kind,
        train=True,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    images, epoch, start = 0, 0, None
    while images < (args.batches + 2) * args.batch_size:
        for x, _ in loader.epoch(epoch):
            images += len(x)
            if start is None and images >= 2 * args.batch_size:  # warm-up: two batches
                start, images = time.perf_counter(), 0
            if images >= args.batches * args.batch_size and start is not None:
                break
        epoch += 1
        if start is not None and images >= args.batches * args.batch_size:
            break
    seconds = time.perf_counter() - start
    children = peak_rss_mib(children=True)
    queue.put(
        {
            "images_per_s": images / seconds,
            "peak_rss_mib": peak_rss_mib(),
            "worker_peak_rss_mib": children,
        }
    )


def _run(kind: str, args: argparse.Namespace) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run(args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {"dali": [], "torch": []}
    for round_ in range(args.repeats):
        for kind in ("dali", "torch") if round_ % 2 == 0 else ("torch", "dali"):
            result = _run(kind, args)
            runs[kind].append(result)
            print(
                f"{kind}: {result['images_per_s']:.0f} images/s, "
                f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    summary = {}
    for kind, results in runs.items():
        summary[kind] = {key: statistics.median(r[key] for r in results) for key in results[0]}
    return {
        "benchmark": "loader",
        "machine": machine(),
        "shards": str(args.shards),
        "preset": args.preset,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "dali": summary["dali"],
        "torch": summary["torch"],
        "dali_over_torch": summary["dali"]["images_per_s"] / summary["torch"]["images_per_s"],
    }
