"""Benchmarks: ``python -m gala_scale.bench NAME [options]``, NAME one of loss, shards, loader,
train, step, scale, finetune, search, launch.

Each prints progress lines and, as its last line, one JSON object with the medians and ratios it
measured; docs/benchmarks.md records them with the command, date and machine.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gala_scale.bench.common import emit

BENCHMARKS = ("loss", "shards", "loader", "train", "step", "scale", "finetune", "search", "launch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gala_scale.bench", description=__doc__)
    sub = parser.add_subparsers(
        dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}"
    )
    modules = {}
    for name in BENCHMARKS:
        module = importlib.import_module(f"gala_scale.bench.{name}")
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
        modules[name] = module
    args = parser.parse_args(argv)
    emit(modules[args.benchmark].run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
