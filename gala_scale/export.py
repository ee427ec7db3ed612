"""Export a trained run as a self-contained serving artifact.

    python -m gala_scale.export --run runs/x [--checkpoint best|last] --out runs/x/export [--triton]

Writes ``model.onnx`` and ``artifact.json``. The graph (dynamic batch axis, nothing of the GALA
ledger in it) has three outputs: ``logits``, ``raw_probabilities`` (their softmax) and
``probabilities``, re-balanced with the PN scales and tau as graph constants (``p / m^tau``,
renormalised), so any Open Inference Protocol server (Triton, KServe, MLServer, plain ONNX
Runtime) returns the re-balanced prediction with no code of ours. ``artifact.json`` describes
the artifact, readable without torch: class names, training class counts, the eval
preprocessing, the PN scales fitted on the val split and tau, and how the export was checked.
The graph passes ``onnx.checker`` (full check) and is compared with
the torch model through ONNX Runtime on real images of the run's data (logits, and the
re-balanced probabilities against ``rebalance.apply``); the largest differences are printed and
stored. ``--triton`` also lays out a Triton model repository.

The artifact is built in a temporary folder beside ``--out`` and takes its place whole only once
every check has passed (gala_scale.publish): a failed check or a killed export leaves the previous
artifact as it was, and the next export removes what a killed one left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from gala_scale import publish, rebalance
from gala_scale.config import load_config
from gala_scale.data import PAD_LABEL, create_loader
from gala_scale.data.common import open_split
from gala_scale.models import run_preset
from gala_scale.stages import stage_of

FORMAT_VERSION = 2  # 2: PN inside the graph, three outputs
OPSET = 17
INPUT, OUTPUT = "input", "logits"
OUTPUTS = (OUTPUT, "raw_probabilities", "probabilities")
CHECK_IMAGES = 64
TOLERANCE = 1e-3  # max |logit difference| ONNX Runtime vs torch accepted by the export
CUDA_TOLERANCE = 5e-2  # the same through the CUDA provider (TF32 convolutions)
PROB_TOLERANCE = 1e-4  # max |PN probability difference|, graph (fp32) vs rebalance.apply (fp64)
# What an artifact folder holds (and what an older export left): only such a folder is replaced.
ARTIFACT_ENTRIES = (
    "model.onnx",
    "artifact.json",
    "triton",
    ".model.onnx.tmp",
    ".artifact.json.tmp",
)


class ExportError(RuntimeError):
    pass


def _load_run(run_dir: Path, checkpoint: str):
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing; is {run_dir} a run directory?")
    cfg = load_config(values=yaml.safe_load(config_path.read_text()))
    folder = run_dir / ("best" if checkpoint == "best" else "final")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: missing (did the run finish? try --checkpoint last)")
    split = open_split(cfg.data.shards, cfg.data.train_split)
    num_classes = cfg.num_classes or split.num_classes
    try:
        model = stage_of(cfg).trained_model(cfg, num_classes, load_file(weights))
    except (ValueError, RuntimeError) as err:  # ConfigError included; a key mismatch
        raise ExportError(f"{run_dir}: {err}") from None
    info = json.loads((folder / "info.json").read_text()) if (folder / "info.json").exists() else {}
    return cfg, model.eval(), split, info


def _probs(model, cfg, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    loader = create_loader(
        cfg.data.shards,
        split,
        preset=run_preset(cfg.data, cfg.model.name),
        batch_size=64,
        train=False,
        kind="torch",
        num_workers=0,
    )
    probs, labels, images = [], [], []
    with torch.no_grad():
        for x, y in loader.epoch(0):
            keep = y != PAD_LABEL
            probs.append(torch.softmax(model(x[keep]), 1).numpy())
            labels.append(y[keep].numpy())
            images.append(x[keep].numpy())
            if limit and sum(len(b) for b in labels) >= limit:
                break
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(images)


class Rebalanced(torch.nn.Module):
    """The classifier with its predictions: logits, softmax and PN (``p / m^tau``, renormalised).

    The divisor ``m^tau`` is a constant of the graph; without scales both probabilities are the
    softmax. Computed in fp32 whatever the classifier's dtype."""

    def __init__(self, model: torch.nn.Module, scales: list[float] | None, tau: float) -> None:
        super().__init__()
        self.model = model
        divisor = None if scales is None else torch.tensor(scales, dtype=torch.float64) ** tau
        self.register_buffer("divisor", None if divisor is None else divisor.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(x).float()
        raw = torch.softmax(logits, 1)
        if self.divisor is None:
            return logits, raw, raw.clone()
        adjusted = raw / self.divisor
        return logits, raw, adjusted / adjusted.sum(1, keepdim=True)


def export_onnx(
    model: torch.nn.Module,
    crop: int,
    path: Path,
    scales: list[float] | None = None,
    tau: float = 1.0,
) -> None:
    example = torch.zeros(2, 3, crop, crop)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(
        Rebalanced(model, scales, tau).eval(),
        (example,),
        str(tmp),
        input_names=[INPUT],
        output_names=list(OUTPUTS),
        dynamic_axes={INPUT: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUTS}},
        opset_version=OPSET,
        dynamo=False,
    )
    import onnx

    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, path)


def compare_with_torch(
    model,
    onnx_path: Path,
    images: np.ndarray,
    provider: str = "CPUExecutionProvider",
    scales: list[float] | None = None,
    tau: float = 1.0,
) -> tuple[float, float]:
    """Largest |logit| difference between ONNX Runtime (on ``provider``) and torch (CPU, fp32)
    on ``images``, and largest |probability| difference between the graph's ``probabilities``
    and ``rebalance.apply`` (fp64) on torch's softmax; ``nan`` when the provider does not
    start."""
    import onnxruntime as ort

    if provider == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    session = ort.InferenceSession(str(onnx_path), providers=[provider])
    if session.get_providers()[0] != provider:
        return float("nan"), float("nan")
    logits, probs = session.run([OUTPUT, OUTPUTS[2]], {INPUT: images.astype(np.float32)})
    with torch.no_grad():
        want = model(torch.from_numpy(images)).double()
    raw = torch.softmax(want, 1).numpy()
    expected = raw if scales is None else rebalance.apply(raw, np.asarray(scales, np.float64), tau)
    return float(np.abs(logits - want.numpy()).max()), float(np.abs(probs - expected).max())


def compare_on_cuda(
    model, onnx_path: Path, images: np.ndarray, scales: list[float] | None, tau: float
) -> dict:
    """The same comparison through the CUDA provider, where there is a GPU and the provider.

    Its convolutions may use TF32, so it is held to ``CUDA_TOLERANCE`` rather than the CPU's."""
    import onnxruntime as ort

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"this onnxruntime offers only {ort.get_available_providers()}"}
    diff, prob_diff = compare_with_torch(
        model, onnx_path, images, "CUDAExecutionProvider", scales, tau
    )
    if math.isnan(diff):
        raise ExportError("the CUDA provider did not start on this GPU machine")
    if diff > CUDA_TOLERANCE:
        raise ExportError(f"ONNX Runtime on CUDA and torch disagree by {diff:.3g}")
    print(f"ONNX Runtime (CUDA) vs torch: max |logit difference| {diff:.3g}")
    return {"max_abs_logit_diff": diff, "max_abs_probability_diff": prob_diff}


def _scales(run_dir: Path, checkpoint: str, model, cfg) -> tuple[list[float] | None, float, str]:
    """PN scales and tau: the trainer's (same weights) for best, else fitted on val here."""
    pn = run_dir / "pn.json"
    if checkpoint == "best" and pn.is_file():
        stored = json.loads(pn.read_text())
        return stored["scales"], stored["tau"], f"{stored['fitted_on']} (by the trainer)"
    if not cfg.data.val_split:
        return None, cfg.pn.tau, "none"
    probs, labels, _ = _probs(model, cfg, cfg.data.val_split)
    scales = rebalance.fit(probs)
    tau = rebalance.fit_tau(probs, labels, scales) if cfg.pn.fit_tau else cfg.pn.tau
    return [float(s) for s in scales], tau, cfg.data.val_split


def write_triton(out: Path, name: str, preset, num_classes: int, max_batch: int = 64) -> Path:
    """A Triton model repository: <out>/triton/<name>/{config.pbtxt, 1/model.onnx}, all three
    outputs listed."""
    outputs = ",\n".join(
        f'  {{ name: "{o}", data_type: TYPE_FP32, dims: [ {num_classes} ] }}' for o in OUTPUTS
    )
    model_dir = out / "triton" / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "model.onnx", model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{ name: "{INPUT}", data_type: TYPE_FP32, dims: [ 3, {preset.crop}, {preset.crop} ] }}
]
output [
{outputs}
]
dynamic_batching {{
  max_queue_delay_microseconds: 5000
}}
""")
    return model_dir


def _check_replaceable(out: Path) -> None:
    """An existing ``out`` is replaced whole: refuse one that holds more than an artifact."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out}: not a folder")
    other = sorted(p.name for p in out.iterdir() if p.name not in ARTIFACT_ENTRIES)
    if other:
        raise ExportError(
            f"{out}: holds {other[:5]} besides an artifact, and an export replaces the whole "
            "folder: choose another --out"
        )


def _check(model, cfg, onnx_path: Path, scales: list[float] | None, tau: float) -> dict:
    """ONNX Runtime against torch on real images (CPU, and CUDA where there is one); the
    export fails beyond the tolerances."""
    check_split = cfg.data.test_split or cfg.data.val_split or cfg.data.train_split
    _, _, images = _probs(model, cfg, check_split, limit=CHECK_IMAGES)
    images = images[:CHECK_IMAGES]
    diff, prob_diff = compare_with_torch(model, onnx_path, images, scales=scales, tau=tau)
    print(
        f"ONNX Runtime vs torch on {len(images)} {check_split} images: max |logit difference| "
        f"{diff:.3g}, max |re-balanced probability difference| {prob_diff:.3g}"
    )
    if diff > TOLERANCE or prob_diff > PROB_TOLERANCE:
        raise ExportError(
            f"ONNX Runtime and torch disagree by {diff:.3g} in logits (limit {TOLERANCE}) and "
            f"{prob_diff:.3g} in re-balanced probabilities (limit {PROB_TOLERANCE})"
        )
    return {
        "split": check_split,
        "images": len(images),
        "max_abs_logit_diff": diff,
        "max_abs_probability_diff": prob_diff,
        "cuda": compare_on_cuda(model, onnx_path, images, scales, tau),
        "opset": OPSET,
    }


def export(
    run_dir: Path,
    out: Path,
    checkpoint: str = "best",
    triton: bool = False,
    model_name: str = "gala",
) -> dict:
    """Export ``run_dir`` into ``out``, which is replaced whole once every check has passed, and
    left as it was otherwise."""
    cfg, model, split, info = _load_run(run_dir, checkpoint)
    preset = run_preset(cfg.data, cfg.model.name)
    out = Path(out).resolve()  # the temporary folder goes beside the real one
    _check_replaceable(out)
    scales, tau, fitted_on = _scales(run_dir, checkpoint, model, cfg)
    with publish.staged(out) as tmp:
        export_onnx(model, preset.crop, tmp / "model.onnx", scales, tau)
        check = _check(model, cfg, tmp / "model.onnx", scales, tau)
        artifact = {
            "format_version": FORMAT_VERSION,
            "model_name": model_name,
            "architecture": cfg.model.name,
            "onnx": "model.onnx",
            "input": {
                "name": INPUT,
                "datatype": "FP32",
                "shape": [-1, 3, preset.crop, preset.crop],
            },
            "outputs": [
                {"name": name, "datatype": "FP32", "shape": [-1, split.num_classes]}
                for name in OUTPUTS
            ],
            "num_classes": split.num_classes,
            "class_names": list(split.class_names),
            "train_class_counts": list(split.class_counts),
            "preprocess": preset.to_dict(),
            "rebalance": {"scales": scales, "tau": tau, "fitted_on": fitted_on},
            "source": {"run": str(run_dir.resolve()), "checkpoint": checkpoint, **info},
            "check": check,
        }
        (tmp / "artifact.json").write_text(json.dumps(artifact, indent=1))
        if triton:
            write_triton(tmp, model_name, preset, split.num_classes)
    if triton:
        print(f"Triton repository: {out / 'triton' / model_name}")
    return artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gala_scale.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", type=Path, required=True, help="a run directory")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--out", type=Path, help="artifact folder (default <run>/export)")
    parser.add_argument("--model-name", default="gala")
    parser.add_argument("--triton", action="store_true", help="also write a Triton repository")
    args = parser.parse_args(argv)
    try:
        artifact = export(
            args.run, args.out or args.run / "export", args.checkpoint, args.triton, args.model_name
        )
    except (ExportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"exported {artifact['architecture']} ({artifact['num_classes']} classes) to "
        f"{args.out or args.run / 'export'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
