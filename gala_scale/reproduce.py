"""Reproduce the paper's comparison: CE, logit adjustment, balanced softmax, GALA (eq. 6 and the
authors' variant), each with and without PN, same data and seed, one table.

    python -m gala_scale.reproduce --config configs/cifar10_lt_if100.yaml --root <cifar10> \\
        [--epochs 12] [--processes 1] [--out runs/reproduce] [--report docs/results.md]
    python -m gala_scale.reproduce --config configs/cifar10_lt_if100.yaml --shards <set> \\
        --losses ce,balanced_softmax,gala_reference,gala_paper --concurrent --time-limit 270 \\
        --set train.eval_every=20     # the paper's budget, four processes on one GPU

``--root`` is a CIFAR-10/100 folder (official python pickles or train/ + test/ ImageFolder); the
long-tailed shard set is built from it with the imbalance factor in the config's name (or
``--imbalance-factor``). For the other configs build the shard set first (docs/shards.md) and
leave ``--root`` out. The recipe is the config's (ResNet-32, 200 epochs for CIFAR); ``--epochs``
shortens it. The report (markdown) gets the table, the command, date, machine, epochs and wall
time; a per-class plot goes beside it.

``--concurrent`` starts the losses' runs at once (several processes sharing one GPU) instead of
one after another. ``--time-limit S`` sends SIGTERM to runs still going after S seconds: each
checkpoints and stops (``--resume auto`` continues it on the next call), and the summary says
how far it got. The last line printed is a JSON summary of every run (epochs done, last val
record, test results when finished).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
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


def _command(name: str, args: argparse.Namespace, shards: Path, port: int) -> list[str]:
    return [
        *train_command(args.processes, port),
        "--config",
        str(args.config),
        "--resume",
        "auto",
        f"run_dir={_run_dir(name, args)}",
        f"data.shards={shards}",
        f"seed={args.seed}",
        *VARIANTS[name],
        *_overrides(args),
    ]


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--epochs``: the same for every run and for the report."""
    return [*args.set, *([f"train.epochs={args.epochs}"] if args.epochs else [])]


def _run_dir(name: str, args: argparse.Namespace) -> Path:
    return args.out / _name(args) / name


def _train_all(args: argparse.Namespace, shards: Path) -> tuple[dict[str, int], dict]:
    """Run every loss (one after another, or all at once); exit codes and wall seconds."""
    names = args.losses.split(",")
    batches = [names] if args.concurrent else [[n] for n in names]
    codes, seconds = {}, {}
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    for batch in batches:
        start, procs = time.perf_counter(), {}
        for offset, name in enumerate(batch):
            cmd = _command(name, args, shards, args.port + offset)
            print(f"\n== {name}\n$ {' '.join(cmd)}", flush=True)
            procs[name] = subprocess.Popen(cmd, cwd=ROOT)
        for name, proc in procs.items():
            codes[name] = _wait(proc, deadline)
            seconds[name] = time.perf_counter() - start
    return codes, seconds


def _wait(proc: subprocess.Popen, deadline: float | None) -> int:
    """The exit code; at the deadline SIGTERM (the trainer checkpoints and exits 99)."""
    try:
        return proc.wait(None if deadline is None else max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def _summary(name: str, args: argparse.Namespace, code: int, seconds: float) -> dict:
    """How far a run got: epochs done, its last val record, its test results if it finished."""
    run_dir = _run_dir(name, args)
    records = []
    if (run_dir / "metrics.jsonl").exists():
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    val = [r for r in records if r["type"] == "val"]
    out = {"exit": code, "seconds": round(seconds, 1), "epochs_done": len(train)}
    if train:
        out["images_per_s"] = train[-1]["images_per_s"]
    if val:
        out["last_val"] = {k: val[-1][k] for k in ("epoch", "top1", "mean_class_acc")}
    if code == 0 and (run_dir / "results.json").exists():
        res = json.loads((run_dir / "results.json").read_text())
        out["test"] = {
            pn: {k: res["test"][key][k] for k in ("top1", "many", "medium", "few")}
            for pn, key in zip(PN_NAMES, res["test"], strict=True)
        }
    return out


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
    cfg = load_config(args.config, _overrides(args))
    epochs = cfg.train.epochs
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
    p.add_argument("--concurrent", action="store_true", help="run the losses at the same time")
    p.add_argument("--time-limit", type=float, help="stop (checkpointed) after S seconds")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override"
    )
    args = p.parse_args(argv)
    unknown = set(args.losses.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown losses {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    shards = args.shards or Path(load_config(args.config).data.shards)
    if args.root is not None:
        shards = args.out / "shards" / _name(args)
        _build_shards(args, shards)
    codes, seconds = _train_all(args, shards)
    summary = {name: _summary(name, args, codes[name], seconds[name]) for name in codes}
    if all(code == 0 for code in codes.values()):
        results = {
            name: json.loads((_run_dir(name, args) / "results.json").read_text()) for name in codes
        }
        command = " ".join(argv if argv is not None else sys.argv[1:])
        counts = open_split(shards, "train").class_counts
        _report(args, results, seconds, counts, "python -m gala_scale.reproduce " + command)
    print(json.dumps({"reproduce": _name(args), "runs": summary}), flush=True)
    return 0 if all(code in (0, 99) for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
