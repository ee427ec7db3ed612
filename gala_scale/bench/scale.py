"""Benchmark: how the cost of every stage grows with the label space (K = 10, 1,000, 8,142).

    python -m gala_scale.bench scale [--classes 10 1000 8142] [--images 2048] [--repeats 20]
        [--step-repeats 300] [--server-seconds 3] [--big-models resnet50 resnet152]

The same inputs (32 x 32, batch 64) and the tiny model at every K, side by side in one run:

- ``train``: a training step (forward, loss, backward, SGD) with CE, with GALA (built as the
  trainer builds it) and with GALA on the authors' accumulation (``loss.ledger: sum_of_sums``),
  interleaved for ``--step-repeats`` rounds; ``gala_over_ce`` and ``gala_sos_over_ce``;
- ``ledger_sync``: the all-reduce of theta and phi (2 x K floats) between 2 gloo processes;
- ``eval``: the tiny model over ``--images`` images, softmax, ``metrics.summarize`` and PN (fit
  and apply), in a process of its own whose peak RSS is the eval's;
- ``checkpoint``: ``accelerator.save_state`` of model, optimizer and GALA ledger (what
  ``save_checkpoint`` writes): MiB and seconds; also ``--big-models`` at the largest K, which
  must fit Slurm's 30 s between SIGTERM and SIGKILL;
- ``export``: the ONNX export with the PN scales in the graph;
- ``server``: gala-serve on that graph: one-sample binary requests at concurrency 1 and 32
  (p50, p99, requests/s), and the JSON answer's bytes for one image: ``/v1/classify`` (top 5)
  and with ``full=1``, and the Open Inference Protocol JSON answer with all three outputs;
- ``gala_batch``: images/s through the server for ``--images`` encoded images, and its peak RSS
  there and, at the largest K, on 4x the images.

``growth`` is each measure's exponent in K between the smallest and the largest K
(log(cost ratio) / log(K ratio)): 1 is linear. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gala_scale.bench.common import machine
from gala_scale.bench.loss import _gala_vs_ce
from gala_scale.system import free_port, peak_rss_mib

BATCH, SIDE = 64, 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000, 8142])
    parser.add_argument("--images", type=int, default=2048, help="eval and gala-batch images")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per measure")
    parser.add_argument("--step-repeats", type=int, default=300, help="timed rounds of a step")
    parser.add_argument("--server-seconds", type=float, default=3.0, help="load per level")
    parser.add_argument(
        "--big-models", nargs="*", default=["resnet50", "resnet152"], help="checkpoint only"
    )


def _sync_worker(rank: int, port: int, classes: list[int], repeats: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result = {}
    for k in classes:
        ledger = torch.zeros(2, k)
        times = []
        for i in range(repeats + 3):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(ledger)
            if i >= 3:
                times.append(time.perf_counter() - start)
        result[k] = statistics.median(times)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def ledger_sync(classes: list[int], repeats: int) -> dict[int, float]:
    """Median seconds of the ledger all-reduce at each K, between 2 gloo processes."""
    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_sync_worker, args=(r, port, classes, repeats, out)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    result = out.get(timeout=300)
    for p in procs:
        p.join(60)
    return result


def _images(count: int) -> torch.Tensor:
    return torch.randn(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def _per_k(k: int, images: int, folder: str, model_name: str, eval_too: bool) -> dict:
    """One K in a fresh process: eval (time, peak RSS), checkpoint, export and its artifact."""
    import shutil

    from accelerate import Accelerator

    from gala_scale import metrics, rebalance
    from gala_scale.data import presets
    from gala_scale.export import OUTPUTS, export_onnx
    from gala_scale.losses import GALALoss
    from gala_scale.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=k).eval()
    result: dict = {}
    scales = None
    if eval_too:
        x, labels = _images(images), np.arange(images) % k
        counts = np.maximum(1, (1000 * 0.99 ** np.arange(k)).astype(int))
        start = time.perf_counter()
        with torch.no_grad():
            probs = torch.cat([torch.softmax(model(b), 1) for b in x.split(256)]).double().numpy()
        metrics.summarize(probs, labels, counts)
        scales = rebalance.fit(probs)
        metrics.summarize(rebalance.apply(probs, scales, 1.0), labels, counts)
        result["eval_s"] = time.perf_counter() - start
        result["eval_peak_rss_mib"] = peak_rss_mib()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(_images(2)).sum().backward()  # momentum buffers exist, as in a running job
    optimizer.step()
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = GALALoss(k)
    accelerator.register_for_checkpointing(criterion)
    target = Path(folder) / f"checkpoint-{model_name}-{k}"
    start = time.perf_counter()
    accelerator.save_state(str(target))
    result["checkpoint_s"] = time.perf_counter() - start
    result["checkpoint_mib"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / (
        1 << 20
    )
    shutil.rmtree(target)
    if not eval_too:
        return result
    export = Path(folder) / f"export-{k}"
    export.mkdir()
    start = time.perf_counter()
    export_onnx(accelerator.unwrap_model(model).eval(), SIDE, export / "model.onnx", list(scales))
    result["export_s"] = time.perf_counter() - start
    artifact = {
        "format_version": 2,
        "onnx": "model.onnx",
        "input": {"name": "input", "datatype": "FP32", "shape": [-1, 3, SIDE, SIDE]},
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, k]} for n in OUTPUTS],
        "num_classes": k,
        "class_names": [f"class {i:05d}" for i in range(k)],
        "train_class_counts": [1] * k,
        "preprocess": presets.get_preset("cifar").to_dict(),
        "rebalance": {"scales": [float(s) for s in scales], "tau": 1.0, "fitted_on": "bench"},
    }
    (export / "artifact.json").write_text(json.dumps(artifact))
    result["artifact"] = str(export)
    return result


def _in_process(fn, *args) -> dict:
    """``fn(*args)`` in a fresh spawned process (its peak RSS is its own)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _gala_batch(pictures: Path, count: int, port: int, grpc_port: int) -> dict:
    """gala-batch over gRPC on ``count`` images, in a process of its own: its summary line."""
    pictures.mkdir()
    for i in range(count):
        (pictures / f"{i:05d}.png").write_bytes(_png(i))
    argv = ["--server", f"http://127.0.0.1:{port}", "--input", str(pictures)]
    argv += ["--out", str(pictures / "p.jsonl"), "--concurrency", "8"]
    argv += ["--grpc", f"127.0.0.1:{grpc_port}"]
    done = subprocess.run(
        [sys.executable, "-m", "gala_serve.batch", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(done.stdout.splitlines()[-1])
    return {key: summary[key] for key in ("images", "images_per_s", "peak_rss_mib")}


def serve(artifact: Path, seconds: float, folder: Path, batch_images: list[int]) -> dict:
    """gala-serve on ``artifact``: latency at concurrency 1 and 32, answer sizes, gala-batch
    on each of ``batch_images`` image counts (its peak RSS shows whether memory grows)."""
    import httpx
    from gala_serve_bench import load, servers

    log = folder / f"server-{artifact.name}.log"
    proc, port, grpc_port = servers.gala(artifact, 64, "cpu", log)
    result: dict = {}
    try:
        servers.wait_ready(proc, port, log, "/v2/models/gala/ready")
        target = load.Target("binary", "binary", port)
        for level in (1, 32):
            lat, sec = load.load(target, (3, SIDE, SIDE), level, seconds, 1)
            result[f"c{level}"] = load.summary(lat, sec)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        image = _png(0)
        for name, query in (("classify_top5_bytes", ""), ("classify_full_bytes", "&full=1")):
            result[name] = len(http.post(f"/v1/classify?top_k=5{query}", content=image).content)
        x = np.zeros((1, 3, SIDE, SIDE), np.float32)
        spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        doc = {"inputs": [{**spec, "data": x.ravel().tolist()}]}
        result["infer_json_all_outputs_bytes"] = len(
            http.post("/v2/models/gala/infer", json=doc).content
        )
        for count in batch_images:
            summary = _gala_batch(
                folder / f"images-{artifact.name}-{count}", count, port, grpc_port
            )
            result[f"gala_batch_{count}"] = summary
        result["gala_batch_images_per_s"] = result[f"gala_batch_{batch_images[0]}"]["images_per_s"]
        result["server_peak_rss_mib"] = peak_rss_mib(pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return result


def _growth(low_k: int, high_k: int, low: float, high: float) -> float:
    return math.log(high / low) / math.log(high_k / low_k)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    classes = sorted(args.classes)
    inputs = _images(BATCH)
    rows: dict[int, dict] = {}
    from gala_scale.models import create_model

    for k in classes:
        labels = torch.arange(BATCH) % k
        rows[k] = {
            "train": _gala_vs_ce(
                lambda k=k: create_model("tiny", num_classes=k),
                inputs,
                labels,
                k,
                args.step_repeats,
            )
        }
        print(f"K={k}: train {rows[k]['train']}", flush=True)
    for k, seconds in ledger_sync(classes, args.repeats * 5).items():
        rows[k]["ledger_sync_s"] = seconds
    with tempfile.TemporaryDirectory(prefix="gala-scale-bench-") as tmp:
        for k in classes:
            rows[k].update(_in_process(_per_k, k, args.images, tmp, "tiny", True))
            print(f"K={k}: {rows[k]}", flush=True)
            # At the largest K, gala-batch also on 4x the images: its memory must not follow.
            counts = [args.images] + ([4 * args.images] if k == classes[-1] else [])
            rows[k]["server"] = serve(
                Path(rows[k].pop("artifact")), args.server_seconds, Path(tmp), counts
            )
            print(f"K={k}: server {rows[k]['server']}", flush=True)
        big = {
            name: _in_process(_per_k, classes[-1], 0, tmp, name, False) for name in args.big_models
        }
    low, high = classes[0], classes[-1]

    def measures(row: dict) -> dict[str, float]:
        s = row["server"]
        return {
            "train_gala_step_s": row["train"]["gala_step_s"],
            "ledger_sync_s": row["ledger_sync_s"],
            "eval_s": row["eval_s"],
            "eval_peak_rss_mib": row["eval_peak_rss_mib"],
            "checkpoint_s": row["checkpoint_s"],
            "checkpoint_mib": row["checkpoint_mib"],
            "export_s": row["export_s"],
            "server_p50_c1_ms": s["c1"]["p50_ms"],
            "server_p50_c32_ms": s["c32"]["p50_ms"],
            "classify_full_bytes": s["classify_full_bytes"],
            "gala_batch_s_per_image": 1 / s["gala_batch_images_per_s"],
        }

    growth = {
        name: _growth(low, high, value, measures(rows[high])[name])
        for name, value in measures(rows[low]).items()
    }
    return {
        "benchmark": "scale",
        "machine": machine(),
        "batch": BATCH,
        "images": args.images,
        "classes": {str(k): row for k, row in rows.items()},
        f"checkpoint_at_{high}": big,
        "growth_exponent": growth,
        "gala_over_ce_at_largest": rows[high]["train"]["gala_over_ce"],
        "gala_sos_over_ce_at_largest": rows[high]["train"]["gala_sos_over_ce"],
    }
