"""The main job end to end on the embedded synthetic data (the README's first command).

    python -m gala_scale.quickstart [--out runs/quickstart] [--epochs 20]

1. build the synthetic long-tailed shard set (10 classes, imbalance factor 100);
2. train CE and GALA, each with 2 processes (``accelerate launch``, gloo on a CPU);
3. both runs test themselves with and without PN (scales fitted on val);
4. export the GALA run to ONNX, start ``gala-serve`` on 127.0.0.1, and push the test split
   through it with ``gala-batch``;
5. print one table (overall, many, medium, few) and draw a comparison plot.

Every step is a real command of the project, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gala_scale import plots
from gala_scale.config import shortened
from gala_scale.data.common import open_split
from gala_scale.launch import train_command
from gala_scale.serving import send, serving
from gala_scale.system import free_port

ROOT = Path(__file__).resolve().parents[1]


def _run(step: str, cmd: list[str]) -> None:
    print(f"\n== {step}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def _train(name: str, loss: str, args: argparse.Namespace) -> Path:
    run_dir = args.out / name
    cmd = [
        *train_command(2, free_port()),
        "--config",
        "configs/quickstart.yaml",
        "--resume",
        "auto",
        f"run_dir={run_dir}",
        f"data.shards={args.shards}",
        f"loss.name={loss}",
        *shortened(ROOT / "configs" / "quickstart.yaml", args.epochs),
    ]
    _run(f"train {name} (2 processes)", cmd)
    return run_dir


def _serve_and_batch(run_dir: Path, args: argparse.Namespace) -> dict:
    export = run_dir / "export"
    _run(
        "export to ONNX",
        [sys.executable, "-m", "gala_scale.export", "--run", str(run_dir), "--out", str(export)],
    )
    with serving(export, cwd=ROOT, ready_s=120) as server:
        summary = send(server, args.shards, args.out / "served_predictions.jsonl")
    print(json.dumps(summary), flush=True)
    return summary


def _table(runs: dict[str, Path], served: dict) -> str:
    head = f"{'':44}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}"
    lines = [head, "-" * len(head)]

    def cell(v) -> str:
        return f"{'-' if v is None else f'{100 * v:.1f}'}"

    for name, run_dir in runs.items():
        for variant, s in json.loads((run_dir / "results.json").read_text())["test"].items():
            values = [s[k] for k in ("top1", "many", "medium", "few")]
            lines.append(
                f"{name + ': ' + variant:44}"
                + "".join(f"{cell(v):>{w}}" for v, w in zip(values, (9, 8, 8, 8), strict=True))
            )
    values = [served.get(k) for k in ("top1", "many", "medium", "few")]
    lines.append(
        f"{'GALA served (ONNX, stored PN scales)':44}"
        + "".join(f"{cell(v):>{w}}" for v, w in zip(values, (9, 8, 8, 8), strict=True))
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gala_scale.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--shards", type=Path, default=Path("shards/synthetic"))
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args(argv)
    started = time.perf_counter()
    _run(
        "build the synthetic long-tailed shard set",
        [
            sys.executable,
            "-m",
            "gala_scale.shards",
            "build",
            "synthetic",
            "--out",
            str(args.shards),
        ],
    )
    runs = {"CE": _train("ce", "ce", args), "GALA": _train("gala", "gala", args)}
    served = _serve_and_batch(runs["GALA"], args)
    print(f"\n== results on the balanced test split ({served['images']} images), top-1 %\n")
    print(_table(runs, served))
    results = {n: json.loads((d / "results.json").read_text())["test"] for n, d in runs.items()}
    counts = open_split(args.shards, "train").class_counts
    plots.comparison(
        counts,
        {
            "CE": results["CE"]["plain"]["per_class"],
            "GALA": results["GALA"]["plain"]["per_class"],
            "GALA + PN": results["GALA"]["PN, val scales, tau 1"]["per_class"],
        },
        args.out / "comparison.png",
    )
    print(
        f"\nplots: {args.out / 'comparison.png'}, {runs['GALA'] / 'plots'}/*.png, "
        f"{runs['CE'] / 'plots'}/*.png"
    )
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
