"""A scale rehearsal: what a cluster run of a real config does, on one machine, with the true
label space, so that what breaks at 8,142 classes breaks here first.

    python -m gala_scale.rehearse --like inat2018 --out DIR [--scale 0.002] [--epochs 2]
                                  [--model tiny] [--image-size 64x48] [--set key=value ...]
                                  [--stage2] [--slurm] [--no-serve]

1. ``shards synth --like`` writes raw data in the real dataset's own format (iNat JSON or LT
   list files) with the real per-class profile scaled by ``--scale``;
2. the real builder (``shards build inat|list``) turns it into a shard set;
3. ``configs/<like>.yaml`` trains with 2 processes (``accelerate launch``, DDP, as the config
   runs on a cluster), unchanged except for what a rehearsal must shrink, every override
   printed; it is preempted (SIGTERM) once its first checkpoint is written and resumed with
   ``--resume auto``. With ``--slurm`` the same goes through ``sbatch slurm/inat_gala.sh`` on
   two nodes, preempted with ``scancel --signal=TERM``: the job must requeue itself, resume and
   complete;
4. the trainer tests itself with the true label space (many/medium/few, ``per_class.csv``, PN
   fitted on val) and draws its plots;
5. with ``--stage2``, stage 2 of that run on its cached features on 2 processes: GALA with a
   class-balanced sampler (building the cache) and balanced softmax (reading it);
6. the run is exported, served by ``gala-serve`` and the test split sent through ``gala-batch``
   (not with ``--no-serve``).

The last line printed is one JSON object: ``num_classes``, each stage's seconds and peak RSS,
``trainer_top1`` (PN with the stored val scales, as the trainer reports it) and, unless
``--no-serve``, ``served_top1`` (the same images through the server, which applies the same
scales inside the graph).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gala_scale.launch import train_command
from gala_scale.serving import send, serving
from gala_scale.shards import like
from gala_scale.system import free_port, peak_rss_mib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"inat2018": "inat2018", "imagenet_lt": "imagenet_lt", "places_lt": "places_lt"}


class Stages:
    """Runs each stage's command, printed first; keeps its seconds and peak RSS."""

    def __init__(self) -> None:
        self.record: dict[str, dict] = {}

    def run(self, name: str, cmd: list[str], expect: tuple[int, ...] = (0,), **kw) -> int:
        print(f"\n== {name}\n$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, **kw)
        code, rss = _wait(proc)
        self._add(name, time.perf_counter() - start, rss)
        if code not in expect:
            raise RuntimeError(f"{name}: exit {code} (expected {expect}): {' '.join(cmd)}")
        return code

    def _add(self, name: str, seconds: float, rss_mib: float | None) -> None:
        """Record a stage; ``rss_mib`` None where it is not known here (a Slurm job's)."""
        entry = self.record.setdefault(name, {"seconds": 0.0, "peak_rss_mib": None})
        entry["seconds"] = round(entry["seconds"] + seconds, 2)
        if rss_mib is not None:
            entry["peak_rss_mib"] = round(max(entry["peak_rss_mib"] or 0.0, rss_mib), 1)
        rss = "" if rss_mib is None else f", peak RSS {rss_mib:.0f} MiB"
        print(f"   ({seconds:.1f} s{rss})", flush=True)


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap ``proc``: its exit code and the peak RSS (MiB) of it and the children it waited
    for (Linux keeps the largest in the rusage that ``wait4`` returns)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def overrides(args: argparse.Namespace, shards: Path, run_dir: Path) -> list[str]:
    """What the rehearsal changes in the real config: where things are, and what must shrink."""
    return [
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"model.name={args.model}",
        f"train.epochs={args.epochs}",
        "train.eval_every=1",
        "optim.warmup_epochs=0",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={2 * args.batch_size}",
        "data.num_workers=0",
        *args.set,
    ]


def _train_until_checkpoint(stages: Stages, cmd: list[str], run_dir: Path) -> None:
    """Start training; once its first checkpoint is on disk, SIGTERM it as a cluster's
    preemption would, and expect the preempted exit (99)."""
    from gala_scale.rundir import EXIT_PREEMPTED

    print(f"\n== train (2 processes), preempted after its first checkpoint\n$ {' '.join(cmd)}")
    status = run_dir / "exit_status"
    status.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    checkpoints = run_dir / "checkpoints"
    while proc.poll() is None and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        time.sleep(0.5)
    if proc.returncode is None:
        print("   first checkpoint written: SIGTERM", flush=True)
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and its workers, as Slurm does
        code, rss = _wait(proc)
    else:
        code, rss = proc.returncode, None
    stages._add("train, until preempted", time.perf_counter() - start, rss)
    # The launcher's own code on SIGTERM is torch elastic's (1); what the trainer did is in
    # exit_status, which slurm/inat_gala.sh reads the same way to decide on a requeue.
    trainer = int(status.read_text()) if status.is_file() else None
    if trainer not in (EXIT_PREEMPTED, 0):
        raise RuntimeError(f"training ended with {trainer} (launcher {code}), not preempted")
    print(f"   the trainer checkpointed and exited {trainer}", flush=True)


def _slurm(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _job_state(job: str, env: dict) -> dict:
    out = _slurm(["scontrol", "show", "job", job], env)
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _train_on_slurm(
    stages: Stages, config: Path, run_dir: Path, shards: Path, changed: list[str], out: Path
) -> None:
    """``sbatch slurm/inat_gala.sh`` on the cluster that SLURM_CONF names (two nodes, one
    process each); preempted with ``scancel --signal=TERM`` once its first checkpoint is on disk,
    it must requeue itself, resume and complete."""
    extra = [c for c in changed if not c.startswith(("run_dir=", "data.shards="))]
    env = {
        **os.environ,
        "CONFIG": str(config),
        "RUN_DIR": str(run_dir),
        "SHARDS": str(shards),
        "GPUS_PER_NODE": "1",
        "DEEPSPEED_CONFIG": "none",
        "VENV": sys.prefix,
        "PORT": str(free_port()),
        "EXTRA_ARGS": " ".join(extra),
    }
    cmd = ["sbatch", "--parsable", "--gres=none", "--cpus-per-task=1", "--time=60"]
    cmd += [f"--output={out}/slurm-%j.out", f"--chdir={ROOT}", str(ROOT / "slurm/inat_gala.sh")]
    print(f"\n== train on Slurm (2 nodes x 1 process), preempted once\n$ {' '.join(cmd)}")
    start = time.perf_counter()
    job = _slurm(cmd, env).strip().split(";")[0]
    checkpoints, signalled = run_dir / "checkpoints", False
    while True:
        state = _job_state(job, env)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        if not signalled and checkpoints.is_dir() and any(checkpoints.iterdir()):
            print(f"   first checkpoint written: scancel --signal=TERM {job}", flush=True)
            _slurm(["scancel", "--signal=TERM", job], env)
            signalled = True
        time.sleep(1)
    stages._add("train on Slurm, preempted and requeued", time.perf_counter() - start, None)
    if state["JobState"] != "COMPLETED" or int(state.get("Restarts", 0)) < 1:
        log = (out / f"slurm-{job}.out").read_text()[-3000:]
        raise RuntimeError(
            f"Slurm job {job}: {state['JobState']}, restarts {state.get('Restarts')}:\n{log}"
        )
    print(f"   job {job} completed after {state['Restarts']} requeue(s)", flush=True)


def rehearse(args: argparse.Namespace) -> dict:
    out = args.out.resolve()
    raw, shards, run_dir = out / "raw", out / "shards", out / "run"
    stages = Stages()
    py = sys.executable
    synth = [py, "-m", "gala_scale.shards", "synth", "--like", args.like, "--scale"]
    synth += [str(args.scale), "--root", str(raw), "--workers", str(args.workers)]
    if args.image_size:
        synth += ["--image-size", args.image_size]
    if not (raw / ".complete").exists():
        stages.run("synthesize raw data", synth)
        (raw / ".complete").write_text("")
    if not (shards / "manifest.json").exists():
        build = [py, "-m", "gala_scale.shards", *like.build_command(args.like, raw, shards)]
        stages.run("build the shard set", [*build, "--workers", str(args.workers)])
    config = ROOT / "configs" / f"{CONFIGS[args.like]}.yaml"
    changed = overrides(args, shards, run_dir)
    print(f"\nconfig {config.relative_to(ROOT)}, overridden: {' '.join(changed)}", flush=True)
    train = [*train_command(2, free_port()), "--config", str(config), "--resume", "auto"]
    if args.slurm and not (run_dir / "results.json").exists():
        _train_on_slurm(stages, config, run_dir, shards, changed, out)
    elif not (run_dir / "results.json").exists():
        _train_until_checkpoint(stages, [*train, *changed], run_dir)
        stages.run("train, resumed", [*train, *changed])
    results = json.loads((run_dir / "results.json").read_text())
    second = _stage2(stages, args, train, shards, run_dir, out) if args.stage2 else None
    trained = {
        "like": args.like,
        "scale": args.scale,
        "num_classes": len(results["test"]["plain"]["per_class"]),
        "overrides": changed,
        "stages": stages.record,
        "trainer_top1": results["test"][f"PN, val scales, tau {results['tau']:g}"]["top1"],
        **({"stage2": second} if second else {}),
    }
    if args.no_serve:
        return trained
    export = out / "export"
    stages.run(
        "export to ONNX",
        [py, "-m", "gala_scale.export", "--run", str(run_dir), "--out", str(export)],
    )
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    served = _serve_and_batch(stages, export, shards, cfg["data"]["test_split"], out)
    return trained | {"served_top1": served["top1"], "served": served}


def _stage2(stages, args, train: list[str], shards: Path, run_dir: Path, out: Path) -> dict:
    """Stage 2 of the run on its cached features, twice: GALA with a class-balanced sampler
    (which builds the cache) and balanced softmax (which reads it)."""
    results, cache = {}, run_dir / "features"
    for loss, name in (("gala", "stage 2, building the feature cache"), ("balanced_softmax", "")):
        folder = out / f"stage2_{loss}"
        extra = ["stage2.enabled=true", f"stage2.from_run={run_dir}", f"loss.name={loss}"]
        extra += ["stage2.sampler=class_balanced"] if loss == "gala" else []
        changed = [*overrides(args, shards, folder), *extra]
        stages.run(name or "stage 2, reading the feature cache", [*train, *changed])
        done = json.loads((folder / "results.json").read_text())
        results[loss] = done["test"][f"PN, val scales, tau {done['tau']:g}"]["top1"]
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())  # its versions
    return {"top1": results, "feature_cache_mib": round(size / 2**20, 2)}


def _serve_and_batch(stages: Stages, export: Path, shards: Path, split: str, out: Path) -> dict:
    start = time.perf_counter()
    with serving(export, "--providers", "cpu", grpc=True, cwd=ROOT) as server:
        stages._add("serve: load and warm up", time.perf_counter() - start, None)
        preds = out / "served_predictions.jsonl"
        start = time.perf_counter()
        doc = send(server, shards, preds, split=split, use_grpc=True)
        stages._add("gala-batch through the server", time.perf_counter() - start, None)
        server_rss = peak_rss_mib(pid=server.process.pid)
    stages.record["serve: load and warm up"]["peak_rss_mib"] = round(server_rss, 1)
    (out / "served_summary.json").write_text(json.dumps(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gala_scale.rehearse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--like", choices=sorted(CONFIGS), default="inat2018")
    p.add_argument("--out", type=Path, required=True, help="everything goes here")
    p.add_argument("--scale", type=float, default=0.002, help="of the real per-class counts")
    p.add_argument("--image-size", help="WxH of the synthetic images (default: the real ones)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model", default="tiny", help="model.name for the rehearsal")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="synth and build processes")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value")
    p.add_argument("--stage2", action="store_true", help="also stage 2 on cached features")
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="stop before step 6 (export, serve, gala-batch: the same code with or without "
        "--slurm)",
    )
    p.add_argument(
        "--slurm",
        action="store_true",
        help="train through slurm/inat_gala.sh on the Slurm cluster SLURM_CONF names "
        "(bash tools/slurm_cluster.sh start makes a local two-node one)",
    )
    args = p.parse_args(argv)
    try:
        result = rehearse(args)
    except (RuntimeError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
