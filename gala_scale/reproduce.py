"""Reproduce the paper's comparison: CE, logit adjustment, balanced softmax, GALA (eq. 6 and the
authors' variant) and the field's competitors (focal, class-balanced, LDAM-DRW and GCL on a cosine
head), each plain and with each post-hoc option (PN, post-hoc logit adjustment, tau-norm), same
data and seeds, one table.

    python -m gala_scale.reproduce --config configs/cifar10_lt_if100.yaml --root <cifar10> \\
        [--epochs 12] [--processes 1] [--out runs/reproduce] [--report docs/results.md]
    python -m gala_scale.reproduce --config configs/cifar10_lt_if100.yaml --shards <set> \\
        --losses ce,balanced_softmax,gala_reference,gala_paper,gala_reference_sos --concurrent \\
        --time-limit 270 --set train.eval_every=20     # the paper's budget, five processes, one GPU

``--root`` is a CIFAR-10/100 folder (official python pickles or train/ + test/ ImageFolder); the
long-tailed shard set is built from it with the imbalance factor in the config's name (or
``--imbalance-factor``). For the other configs build the shard set first (docs/shards.md) and
leave ``--root`` out. The recipe is the config's (ResNet-32, 200 epochs for CIFAR); ``--epochs``
shortens it. The report (markdown) gets the table, the command, date, machine, epochs and wall
time; a per-class plot goes beside it.

``--seeds 0 1 2`` trains each loss once per seed (the shard set stays the one of ``--data-seed``)
and the table gives mean +- sample standard deviation over the seeds. Each run lives in
``<out>/<name>/<loss>/seed<k>``. The raw figures behind the table (every run's test results, per
class included) go to ``<report folder>/results/<name>_<epochs>ep.json``; ``--tables FILE ...``
prints the tables again from such files, without training.

A call reuses the runs an earlier call finished with the same configuration (exit status 0,
``results.json``), so a longer list of seeds or losses only trains what is new; their wall time
is reported as 0. ``--keep FILE`` puts every run of a raw results file (one committed under
``docs/results/``, when the run folders are gone) into this call's table as it is, if the file's
data set, epochs, model and training counts are this call's, and trains only the runs it lacks:
``--keep docs/results/x.json --seeds 0 1 2`` adds seeds 1 and 2 to a committed seed 0. Each run
keeps its date in the raw file, and each row of the table says over which seeds it is.

``--in-process`` trains the runs one after another inside this process (the trainer's ``main``
called for each): a stage-2 sweep on a feature cache, whose runs take seconds, then pays no
interpreter, import and start-up a run.

    python -m gala_scale.reproduce --config configs/cifar10_lt_if100_lite0.yaml --shards <set> \
        --in-process --seeds 0 1 2 3 4 --set model.pretrained=<weights>   # every loss, 5 seeds

``--concurrent`` starts the runs at once (several processes sharing one GPU) instead of
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
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gala_scale import plots
from gala_scale.config import load_config, shortened
from gala_scale.launch import train_command
from gala_scale.shards.manifest import ManifestError, load_manifest
from gala_scale.shards.sources import VAL_FROM
from gala_scale.tables import PN_NAMES, tables, variant_results

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ce": ["loss.name=ce"],
    "logit_adjusted": ["loss.name=logit_adjusted"],
    "balanced_softmax": ["loss.name=balanced_softmax"],
    "gala_paper": ["loss.name=gala", "loss.variant=paper"],
    "gala_reference": ["loss.name=gala", "loss.variant=reference"],
    "gala_counts": ["loss.name=gala", "loss.variant=reference", "loss.ledger_init=counts"],
    # The authors' accumulation: the logits take the running sum of the running sum.
    "gala_reference_sos": ["loss.name=gala", "loss.variant=reference", "loss.ledger=sum_of_sums"],
    "gala_paper_sos": ["loss.name=gala", "loss.variant=paper", "loss.ledger=sum_of_sums"],
    "focal": ["loss.name=focal"],
    "class_balanced": ["loss.name=class_balanced"],
    # LDAM's and GCL's recipes: their losses on a cosine classifier.
    "ldam_drw": ["loss.name=ldam_drw", "model.head=cosine"],
    "gcl": ["loss.name=gcl", "model.head=cosine"],
}


def _factor(args: argparse.Namespace) -> int:
    if args.imbalance_factor:
        return args.imbalance_factor
    found = re.search(r"_if(\d+)", args.config.stem)
    if found is None:
        raise SystemExit(f"{args.config}: no _if<N> in its name; pass --imbalance-factor")
    return int(found.group(1))


def _built_factor(shards: Path | None) -> str | None:
    """The imbalance factor a shard set's manifest records it was built with, if any."""
    if shards is None:
        return None
    try:
        factor = float(load_manifest(shards)["build"]["imbalance_factor"])
    except (ManifestError, TypeError, KeyError, ValueError):  # no manifest, no factor recorded
        return None
    return f"{factor:g}"


def _name(args: argparse.Namespace) -> str:
    """The config's name with the imbalance factor actually used (shard set, runs, report): the
    one asked for with ``--root``, or the one an existing ``--shards`` set was built with."""
    factor = _factor(args) if args.root is not None else _built_factor(args.shards)
    if factor is None:
        return args.config.stem
    tagged = f"_if{factor}"
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
        str(args.data_seed),
        "--val-from",
        args.val_from,
        "--out",
        str(shards),
        *(["--val-per-class", str(args.val_per_class)] if args.val_per_class else []),
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _command(run: tuple[str, int], args: argparse.Namespace, shards: Path, port: int) -> list[str]:
    return [
        *train_command(args.processes, port),
        "--config",
        str(args.config),
        "--resume",
        "auto",
        *_run_overrides(run, args, shards),
    ]


def _run_overrides(run: tuple[str, int], args: argparse.Namespace, shards: Path) -> list[str]:
    name, seed = run
    return [
        f"run_dir={_run_dir(run, args)}",
        f"data.shards={shards}",
        f"seed={seed}",
        *VARIANTS[name],
        *_overrides(args),
    ]


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--epochs`` (the warm-up cut with it): the same for every
    run and for the report."""
    return [*args.set, *(shortened(args.config, args.epochs, args.set) if args.epochs else [])]


def _run_dir(run: tuple[str, int], args: argparse.Namespace) -> Path:
    name, seed = run
    return args.out / args.name / name / f"seed{seed}"


def _label(run: tuple[str, int]) -> str:
    return f"{run[0]}/seed{run[1]}"


def _train_all(args: argparse.Namespace, shards: Path) -> tuple[dict, dict]:
    """Run every (loss, seed) (one after another, or all at once); exit codes and wall seconds."""
    runs = [(name, seed) for seed in args.seeds for name in args.losses.split(",")]
    batches = [runs] if args.concurrent else [[r] for r in runs]
    codes, seconds = {}, {}
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    for batch in batches:
        start, procs = time.perf_counter(), {}
        for offset, run in enumerate(batch):
            if _kept(run, args) is not None:
                print(f"\n== {_label(run)}: kept from {args.keep}", flush=True)
                codes[run], seconds[run] = 0, _kept(run, args)["seconds"]
                continue
            if _finished(run, args, shards):
                print(f"\n== {_label(run)}: finished by an earlier call, kept", flush=True)
                codes[run], seconds[run] = 0, 0.0
                continue
            if args.in_process:
                codes[run], seconds[run] = _train_here(run, args, shards)
                continue
            cmd = _command(run, args, shards, args.port + offset)
            print(f"\n== {_label(run)}\n$ {' '.join(cmd)}", flush=True)
            procs[run] = subprocess.Popen(cmd, cwd=ROOT)

        def finish(item, start=start):
            run, proc = item
            return run, _wait(proc, deadline), time.perf_counter() - start

        # One waiter a process, so that each run's seconds end when it does.
        with ThreadPoolExecutor(max(1, len(procs))) as pool:
            for run, code, spent in pool.map(finish, procs.items()):
                codes[run], seconds[run] = code, spent
    return codes, seconds


def _train_here(run: tuple[str, int], args: argparse.Namespace, shards: Path) -> tuple:
    """``run`` through the trainer's ``main`` in this process (``--in-process``): no
    interpreter, import or start-up a run, which is most of a stage-2 run's time."""
    from gala_scale import train

    argv = ["--config", str(args.config), "--resume", "auto", *_run_overrides(run, args, shards)]
    print(f"\n== {_label(run)} (in this process)\n$ train {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    try:
        code = train.main(argv)
    except Exception:  # as a subprocess's crash would be: this run fails, the sweep goes on
        traceback.print_exc()
        code = 1
    return code, time.perf_counter() - start


def _kept(run: tuple[str, int], args: argparse.Namespace) -> dict | None:
    """The entry of ``run`` in the ``--keep`` raw results file, if it has one."""
    return args.kept.get("runs", {}).get(run[0], {}).get(str(run[1]))


def _load_kept(args: argparse.Namespace, shards: Path) -> dict:
    """The ``--keep`` file, after checking that its runs were made under this call's set-up."""
    if args.keep is None:
        return {}
    try:
        kept = json.loads(args.keep.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--keep {args.keep}: {err}") from err
    cfg = load_config(args.config, _overrides(args))
    manifest = load_manifest(shards)
    wanted = {
        "name": args.name,
        "epochs": cfg.train.epochs,
        "model": cfg.model.name,
        "val_from": _val_from(manifest),
        "train_class_counts": manifest["splits"]["train"]["class_counts"],
    }
    for field, value in wanted.items():
        if kept.get(field) != value:
            raise SystemExit(
                f"--keep {args.keep}: field {field!r} is {kept.get(field)!r}, this call's is "
                f"{value!r}; its runs cannot join this table"
            )
    return kept


def _val_from(manifest: dict) -> str:
    return manifest.get("val_from") or "the source's own val split"


def _finished(run: tuple[str, int], args: argparse.Namespace, shards: Path) -> bool:
    """A run that ended with its report under this call's configuration: reused, not rerun."""
    run_dir = _run_dir(run, args)
    status = run_dir / "exit_status"
    if not (status.is_file() and status.read_text().strip() == "0"):
        return False
    if not (run_dir / "results.json").is_file():
        return False
    wanted = load_config(args.config, _run_overrides(run, args, shards))
    return load_config(run_dir / "config.yaml") == wanted


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


def _summary(run: tuple[str, int], args: argparse.Namespace, code: int, seconds: float) -> dict:
    """How far a run got: epochs done, its last val record, its test results if it finished."""
    run_dir = _run_dir(run, args)
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
        out["test"] = variant_results(json.loads((run_dir / "results.json").read_text()), False)
    return out


def _raw(args, runs: list[tuple[str, int]], seconds: dict, shards: Path, command: str) -> dict:
    cfg = load_config(args.config, _overrides(args))
    manifest = load_manifest(shards)
    by_loss: dict[str, dict] = {}
    today = _dt.date.today().isoformat()
    kept = [(n, int(seed)) for n, by_seed in args.kept.get("runs", {}).items() for seed in by_seed]
    runs = runs + [run for run in kept if run not in runs]
    for run in runs:
        entry = _kept(run, args)
        if entry is None:
            res = json.loads((_run_dir(run, args) / "results.json").read_text())
            entry = {"seconds": round(seconds[run], 1), "date": today}
            entry["test"] = variant_results(res, True)
        else:
            entry = {"date": args.kept["date"], **entry}
        by_loss.setdefault(run[0], {})[str(run[1])] = entry
    dates = sorted({e["date"] for by_seed in by_loss.values() for e in by_seed.values()})
    return {
        "name": args.name,
        "epochs": cfg.train.epochs,
        "model": cfg.model.name,
        "seeds": sorted({seed for _, seed in runs}),
        "command": command,
        "date": ", ".join(dates),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{args.processes} training process(es) a run",
        "val_from": _val_from(manifest),
        "train_class_counts": manifest["splits"]["train"]["class_counts"],
        "runs": by_loss,
    }


def _report(args, raw: dict) -> None:
    image = args.report.parent / "img" / f"results_{raw['name']}_{raw['epochs']}ep.png"

    def mean_curve(by_seed: dict, pn: str) -> list[float]:
        curves = [r["test"][pn]["per_class"] for r in by_seed.values()]
        return [statistics.mean(c) for c in zip(*curves, strict=True)]

    curves = {f"{n} (plain)": mean_curve(r, "plain") for n, r in raw["runs"].items()}
    for name in ("gala_reference", "gala_counts"):
        if name in raw["runs"]:
            curves[f"{name} + PN"] = mean_curve(raw["runs"][name], PN_NAMES["PN, val scales"])
    plots.comparison(raw["train_class_counts"], curves, image)
    stored = args.report.parent / "results" / f"{raw['name']}_{raw['epochs']}ep.json"
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(raw, indent=1) + "\n")  # keys in run order: the table's rows
    picture = f"![per-class accuracy]({image.relative_to(args.report.parent)})"
    section = [*tables(raw), picture, ""]
    old = args.report.read_text() if args.report.exists() else "# Results\n\n"
    args.report.write_text(old.rstrip("\n") + "\n\n" + "\n".join(section))
    print("\n".join(section))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gala_scale.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path)
    p.add_argument("--root", type=Path, help="raw CIFAR folder to build the shards from")
    p.add_argument("--shards", type=Path, help="an existing shard set (default: the config's)")
    p.add_argument("--imbalance-factor", type=int)
    p.add_argument("--epochs", type=int, help="shorter than the config's recipe")
    p.add_argument("--losses", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--port", type=int, default=29531, help="rendezvous port with --processes > 1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--data-seed", type=int, default=0, help="the long-tailed subset's seed")
    p.add_argument("--val-per-class", type=int, help="with --root: val images a class")
    p.add_argument(
        "--val-from",
        choices=VAL_FROM,
        default="reserved",
        help="with --root: val set aside before subsampling (every class) or from what the "
        "subset leaves out (the literature's counts); docs/shards.md",
    )
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--report", type=Path, default=Path("runs/reproduce/results.md"))
    p.add_argument("--concurrent", action="store_true", help="run the losses at the same time")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="train every run in this process, one after another (a stage-2 sweep)",
    )
    p.add_argument("--time-limit", type=float, help="stop (checkpointed) after S seconds")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override"
    )
    p.add_argument("--tables", type=Path, nargs="+", help="print the tables of raw result files")
    p.add_argument("--keep", type=Path, help="a raw results file whose runs join the table")
    args = p.parse_args(argv)
    if args.tables:
        for path in args.tables:
            print("\n".join(tables(json.loads(path.read_text()), path.name)))
        return 0
    if args.config is None:
        p.error("--config is required (or --tables)")
    if args.in_process and (args.concurrent or args.processes > 1 or args.time_limit):
        p.error(
            "--in-process trains one run at a time in one process: no --concurrent, "
            "--processes > 1 or --time-limit"
        )
    unknown = set(args.losses.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown losses {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    shards = args.shards or Path(load_config(args.config).data.shards)
    if args.root is None:
        args.shards = shards  # the name tells the factor the set was built with
    args.name = _name(args)  # once: the runs, the report and the raw figures go under it
    if args.root is not None:
        shards = args.out / "shards" / args.name
        _build_shards(args, shards)
    args.kept = _load_kept(args, shards)
    codes, seconds = _train_all(args, shards)
    summary = {_label(run): _summary(run, args, codes[run], seconds[run]) for run in codes}
    if all(code == 0 for code in codes.values()):
        command = " ".join(argv if argv is not None else sys.argv[1:])
        raw = _raw(args, list(codes), seconds, shards, "python -m gala_scale.reproduce " + command)
        _report(args, raw)
    print(json.dumps({"reproduce": args.name, "runs": summary}), flush=True)
    return 0 if all(code in (0, 99) for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
