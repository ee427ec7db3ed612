"""Benchmark: what starting a process costs before it trains.

    python -m gala_scale.bench launch [--repeats 5]

Side by side in one run, interleaved rounds, medians of wall seconds, each command run to its
end: Accelerate's launcher through its CLI (``accelerate launch --help``) and as the project
starts it (``python -m accelerate.commands.launch --help``,
:data:`gala_scale.launch.ACCELERATE_LAUNCH`), the trainer's imports
(``python -c "import gala_scale.train"``) and a bare ``import torch`` as the floor.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from gala_scale.bench.common import interleaved_medians, machine
from gala_scale.launch import ACCELERATE_LAUNCH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per command")


def run(args: argparse.Namespace) -> dict:
    commands = {
        "accelerate_cli": [str(Path(sys.executable).parent / "accelerate"), "launch", "--help"],
        "accelerate_module": [*ACCELERATE_LAUNCH, "--help"],
        "import_trainer": [sys.executable, "-c", "import gala_scale.train"],
        "import_torch": [sys.executable, "-c", "import torch"],
    }

    def runner(cmd: list[str]):
        return lambda: subprocess.run(cmd, check=True, capture_output=True)

    fns = {name: runner(cmd) for name, cmd in commands.items()}
    medians = interleaved_medians(fns, args.repeats, warmup=0)  # each run is a cold start
    for name, seconds in medians.items():
        print(f"{name}: {seconds:.2f} s", flush=True)
    return {
        "benchmark": "launch",
        "seconds": {k: round(v, 3) for k, v in medians.items()},
        "cli_over_module": round(medians["accelerate_cli"] / medians["accelerate_module"], 2),
        "machine": machine(),
    }
