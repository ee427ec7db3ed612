"""Timing helpers shared by the benchmarks: side-by-side runs, medians, machine facts."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating order.

    Alternating the candidates within every round spreads the drift of a shared machine (other
    processes, thermal state) evenly over them, so their ratio is fairer than back-to-back runs.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> dict[str, object]:
    return {
        "date": _dt.date.today().isoformat(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def emit(result: dict[str, object]) -> None:
    """Print the benchmark's result as the last line: one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)
