"""Timings in this process, without a server in the way: the server's ONNX Runtime session
alone, ONNX Runtime vs torch eager on the same weights, and gala-batch's images/s."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gala_serve_bench.load import inputs


def _medians(calls: dict, repeats: int) -> dict[str, float]:
    """Median ms of each no-argument call, run interleaved (order flipped every round)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats + 2):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def model_alone(artifact: Path, providers: str, repeats: int = 20) -> dict:
    """The server's ONNX Runtime session without HTTP: ms a sample at batch 1 and 64."""
    from gala_serve.model import Model

    model = Model(artifact, providers)
    x1, x64 = inputs(model.input_shape, 1), inputs(model.input_shape, 64)
    ms = _medians({"1": lambda: model.outputs(x1), "64": lambda: model.outputs(x64)}, repeats)
    return {
        "provider": model.provider,
        "batch1_ms_per_sample": ms["1"],
        "batch64_ms_per_sample": ms["64"] / 64,
        "batch_gain": ms["1"] / (ms["64"] / 64),
    }


def ort_vs_torch(artifact: Path, device: str, repeats: int = 20) -> dict | None:
    """ONNX Runtime vs torch eager, same weights, host arrays in and out; None without torch.

    The eager model is built from its definition in gala-scale (the artifact holds only the
    ONNX graph), so this comparison runs where the training package is installed too."""
    try:
        import torch
        from safetensors.torch import load_file

        from gala_scale.models import create_model
    except ImportError:
        return None
    import onnxruntime as ort

    doc = json.loads((artifact / "artifact.json").read_text())
    source = Path(doc["source"]["run"]) / (
        "best" if doc["source"]["checkpoint"] == "best" else "final"
    )
    model = create_model(doc["architecture"], num_classes=doc["num_classes"]).eval()
    model.load_state_dict(load_file(source / "model.safetensors"))
    model.to(device)
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    session = ort.InferenceSession(str(artifact / doc["onnx"]), providers=[provider])

    def eager(tx: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(tx.to(device)).cpu().numpy()  # .cpu() waits for the GPU

    result = {}
    for batch in (1, 64):
        x = inputs(tuple(doc["input"]["shape"][1:]), batch)
        tx = torch.from_numpy(x)
        ms = _medians(
            {
                "ort": lambda x=x: session.run(["logits"], {"input": x}),
                "torch": lambda tx=tx: eager(tx),
            },
            repeats,
        )
        result[f"batch{batch}"] = {
            "ort_ms": ms["ort"],
            "torch_ms": ms["torch"],
            "ort_speedup": ms["torch"] / ms["ort"],
        }
    return result


def cuda_for_torch() -> bool:
    """Whether torch is installed and sees a GPU."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def batch_throughput(url: str, shards: Path) -> dict:
    """gala-batch on ``shards``' test split through the server at ``url``: images/s."""
    from gala_serve.batch import main as batch_main

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        argv = ["--server", url, "--input", str(shards), "--out", f"{tmp}/p.jsonl"]
        batch_main([*argv, "--concurrency", "8"])
        seconds = time.perf_counter() - start
        images = len(Path(f"{tmp}/p.jsonl").read_text().splitlines())
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}
