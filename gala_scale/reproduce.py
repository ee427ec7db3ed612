"""Reproduce the paper's comparison: CE, logit adjustment, balanced softmax, GALA (eq. 6 and the
authors' variant), each with and without PN, same data and seed, one table.

    python -m gala_scale.reproduce --config configs/cifar10_lt_if100.yaml --root <cifar10> \\
        [--epochs 12] [--processes 1] [--out runs/reproduce] [--report docs/results.md]

``--root`` is a CIFAR-10/100 folder (official python pickles or train/ + test/ ImageFolder); the
long-tailed shard set is built from it with the imbalance factor in the config's name (or
``--imbalance-factor``). For the other configs build the shard set first (docs/shards.md) and
leave ``--root`` out. The recipe is the config's (ResNet-32, 200 epochs for CIFAR); ``--epochs``
shortens it. The report (markdown) gets the table, the command, date, machine, epochs and wall
time; a per-class plot goes beside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from gala_scale import plots
from gala_scale.config import load_config
from gala_scale.data.common import open_split
from gala_scale.launch import train_command

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ce": ["loss.name=ce"],
    "logit_adjusted": ["loss.name=logit_adjusted"],
    "balanced_softmax": ["loss.name=balanced_softmax"],
    "gala_paper": ["loss.name=gala", "loss.variant=paper"],
    "gala_reference": ["loss.name=gala", "loss.variant=reference"],
}
PN_NAMES = ("plain", "PN (val scales)", "PN (transductive, paper's protocol)")


def _factor(args: argparse.Namespace) -> int:
    if args.imbalance_factor:
        return args.imbalance_factor
    found = re.search(r"_if(\d+)", args.config.stem)
    if found is None:
        raise SystemExit(f"{args.config}: no _if<N> in its name; pass --imbalance-factor")
    return int(found.group(1))


def _name(args: argparse.Namespace) -> str:
    """The config's name with the imbalance factor actually used (shard set, runs, report)."""
    if args.root is None:
        return args.config.stem
    tagged = f"_if{_factor(args)}"
    stem = args.config.stem
    return re.sub(r"_if\d+", tagged, stem) if "_if" in stem else stem + tagged


def _build_shards(args: argparse.Namespace, shards: Path) -> None:
    factor = _factor(args)
    cmd = [
        sys.executable,
        "-m",
        "gala_scale.shards",
        "build",
        "cifar",
        "--root",
        str(args.root),
        "--imbalance-factor",
        str(factor),
        "--seed",
        str(args.seed),
        "--out",
        str(shards),
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _train(name: str, args: argparse.Namespace, shards: Path) -> tuple[Path, float]:
    run_dir = args.out / _name(args) / name
    launcher = train_command(args.processes, args.port)
    cmd = [
        *launcher,
        "--config",
        str(args.config),
        "--resume",
        "auto",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"seed={args.seed}",
        *VARIANTS[name],
    ]
    if args.epochs:
        cmd.append(f"train.epochs={args.epochs}")
    print(f"\n== {name}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir, time.perf_counter() - start


def _rows(results: dict[str, dict]) -> list[str]:
    rows = ["| loss | PN | overall | many | medium | few |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        for pn, summary in zip(PN_NAMES, res["test"].values(), strict=True):
            cells = [
                "-" if summary[k] is None else f"{100 * summary[k]:.1f}"
                for k in ("top1", "many", "medium", "few")
            ]
            rows.append(f"| {name} | {pn} | " + " | ".join(cells) + " |")
    return rows


def _report(args, results, seconds, counts, command: str) -> None:
    cfg = load_config(args.config)
    epochs = args.epochs or cfg.train.epochs
    image = args.report.parent / "img" / f"results_{_name(args)}_{epochs}ep.png"
    curves = {f"{name} (plain)": r["test"]["plain"]["per_class"] for name, r in results.items()}
    if "gala_reference" in results:
        pn = list(results["gala_reference"]["test"].values())[1]
        curves["gala_reference + PN"] = pn["per_class"]
    plots.comparison(counts, curves, image)
    section = [
        f"## {_name(args)}, {epochs} epochs ({cfg.model.name}, seed {args.seed})",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {_dt.date.today().isoformat()}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, {args.processes} training process(es). Wall time per run: "
        + ", ".join(f"{n} {s / 60:.1f} min" for n, s in seconds.items())
        + ".",
        "",
        *_rows(results),
        "",
        f"![per-class accuracy]({image.relative_to(args.report.parent)})",
        "",
    ]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    old = args.report.read_text() if args.report.exists() else "# Results\n\n"
    args.report.write_text(old.rstrip("\n") + "\n\n" + "\n".join(section))
    print("\n".join(section))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gala_scale.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--root", type=Path, help="raw CIFAR folder to build the shards from")
    p.add_argument("--shards", type=Path, help="an existing shard set (default: the config's)")
    p.add_argument("--imbalance-factor", type=int)
    p.add_argument("--epochs", type=int, help="shorter than the config's recipe")
    p.add_argument("--losses", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--port", type=int, default=29531, help="rendezvous port with --processes > 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--report", type=Path, default=Path("runs/reproduce/results.md"))
    args = p.parse_args(argv)
    unknown = set(args.losses.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown losses {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    shards = args.shards or Path(load_config(args.config).data.shards)
    if args.root is not None:
        shards = args.out / "shards" / _name(args)
        _build_shards(args, shards)
    results, seconds = {}, {}
    for name in args.losses.split(","):
        run_dir, seconds[name] = _train(name, args, shards)
        results[name] = json.loads((run_dir / "results.json").read_text())
    counts = open_split(shards, "train").class_counts
    _report(
        args,
        results,
        seconds,
        counts,
        "python -m gala_scale.reproduce " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
