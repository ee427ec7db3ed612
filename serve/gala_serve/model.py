"""The served model: an ONNX Runtime session over the artifact, whose graph applies the PN
scales itself (outputs ``logits``, ``raw_probabilities``, ``probabilities``)."""

from __future__ import annotations

import ctypes.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # gala_scale.export's: PN inside the graph
OUTPUTS = ("logits", "raw_probabilities", "probabilities")
REQUIRED = (
    "format_version",
    "onnx",
    "input",
    "outputs",
    "num_classes",
    "class_names",
    "preprocess",
    "rebalance",
)


class ArtifactError(ValueError):
    pass


_ABSENT = object()  # a field the artifact does not have


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _list(value, item, length: int | None) -> bool:
    return (
        isinstance(value, list)
        and all(item(v) for v in value)
        and (length is None or len(value) == length)
    )


def _schema(k: int | None) -> dict:
    """Each field the server reads: (its test, what it should be), as gala_scale.export writes
    it; ``k`` (num_classes, when valid) sizes the per-class lists. A field is checked only when
    the object holding it passed."""
    n = f"{k} " if k else "num_classes "

    def text(v) -> bool:
        return isinstance(v, str)

    return {
        "num_classes": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "class_names": (lambda v: _list(v, text, k), f"a list of {n}strings"),
        "train_class_counts": (
            lambda v: v is _ABSENT or _list(v, _is_int, k),
            f"a list of {n}integers",
        ),
        "onnx": (lambda v: text(v) and v != "", "the graph's file name"),
        "input": (lambda v: isinstance(v, dict), "an object"),
        "input.name": (text, "a string"),
        "input.shape": (lambda v: _list(v, _is_int, 4), "[-1, 3, H, W]"),
        "outputs": (
            lambda v: _list(v, lambda o: isinstance(o, dict) and text(o.get("name")), None),
            "a list of objects with a name",
        ),
        "preprocess": (lambda v: isinstance(v, dict), "an object"),
        "preprocess.crop": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "preprocess.eval_resize": (
            lambda v: v in (None, _ABSENT) or (_is_int(v) and v >= 1),
            "null or an integer >= 1",
        ),
        "preprocess.mean": (lambda v: _list(v, _is_number, 3), "3 numbers"),
        "preprocess.std": (lambda v: _list(v, _is_number, 3) and min(v) > 0, "3 numbers > 0"),
        "rebalance": (lambda v: isinstance(v, dict), "an object"),
        "rebalance.scales": (
            lambda v: v in (None, _ABSENT) or _list(v, _is_number, k),
            f"null or a list of {n}numbers (one a class)",
        ),
        "rebalance.tau": (lambda v: v is _ABSENT or _is_number(v), "a number"),
    }


def _problems(doc: dict) -> list[str]:
    """``field: expected ..., got ...`` for each field of ``doc`` that fails its test."""
    k = doc.get("num_classes")
    problems, failed = [], set()
    for field, (ok, expected) in _schema(k if _is_int(k) and k >= 1 else None).items():
        parent, _, name = field.rpartition(".")
        if parent in failed:
            continue
        value = (doc[parent] if parent else doc).get(name, _ABSENT)
        if not ok(value):
            failed.add(field)
            got = "nothing" if value is _ABSENT else json.dumps(value)[:80]
            problems.append(f"{field}: expected {expected}, got {got}")
    return problems


def load_artifact(folder: Path) -> dict:
    """The artifact's description, checked: any fault is an ArtifactError naming the file and
    the fields at fault (all of them)."""
    path = Path(folder) / "artifact.json"
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (export with python -m gala_scale.export)")
    try:
        artifact = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{path}: not valid JSON ({err}); export the run again") from None
    if not isinstance(artifact, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(artifact).__name__}")
    if artifact.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {artifact.get('format_version')}, this server reads "
            f"{FORMAT_VERSION} (PN inside the graph): export the run again"
        )
    missing = [k for k in REQUIRED if k not in artifact]
    if missing:
        raise ArtifactError(f"{path}: missing fields {missing}")
    problems = _problems(artifact)
    if not problems and not (Path(folder) / artifact["onnx"]).is_file():
        problems.append(f"onnx: {artifact['onnx']!r} is not a file in {folder}")
    if problems:
        raise ArtifactError(f"{path}: " + "; ".join(problems))
    return artifact


def choose_providers(wanted: str) -> list[str]:
    """Explicit providers: CUDA when asked for or (auto) when present, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if wanted == "cpu":
        return ["CPUExecutionProvider"]
    if wanted == "cuda" and "CUDAExecutionProvider" not in available:
        raise ArtifactError(f"--providers cuda: this onnxruntime offers only {available}")
    if wanted == "cuda" or ("CUDAExecutionProvider" in available and _gpu_present()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_present() -> bool:
    """A CUDA driver on this machine (without it the CUDA provider only logs errors)."""
    return os.path.exists("/dev/nvidiactl") or ctypes.util.find_library("cuda") is not None


CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def provider_options(names: list[str], device_id: int, conv_algo_search: str) -> list:
    """ONNX Runtime's provider list, the CUDA provider with its options: the GPU to run on and
    how cuDNN picks convolution algorithms (EXHAUSTIVE: timed once for each input shape)."""
    if conv_algo_search not in CONV_ALGO_SEARCH:
        raise ArtifactError(
            f"--cudnn-conv-algo-search: {conv_algo_search!r}; valid: {CONV_ALGO_SEARCH}"
        )
    cuda = {"device_id": str(device_id), "cudnn_conv_algo_search": conv_algo_search}
    return [(n, cuda) if n == "CUDAExecutionProvider" else n for n in names]


class Model:
    """Run the ONNX graph: logits, raw and re-balanced probabilities.

    ``provider`` is what runs; ``fallback`` says why it is not the CUDA provider when ``auto``
    chose CUDA and it did not start (None otherwise), also printed as a warning.
    """

    def __init__(
        self,
        folder: Path,
        providers: str = "auto",
        threads: int = 0,
        device_id: int = 0,
        conv_algo_search: str = "EXHAUSTIVE",
    ) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.artifact = load_artifact(self.folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        asked = choose_providers(providers)
        if asked[0] == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN installed as pip packages (onnxruntime-gpu[cuda,cudnn], or torch's
            # nvidia-* wheels) are not on the loader's path: load them from site-packages.
            ort.preload_dlls()
        path = str(self.folder / self.artifact["onnx"])
        failed = None
        try:
            self.session = ort.InferenceSession(
                path,
                sess_options=options,
                providers=provider_options(asked, device_id, conv_algo_search),
            )
        except Exception as err:  # onnxruntime's own exception types
            if asked[0] != "CUDAExecutionProvider":
                raise
            failed = f"the CUDA provider failed ({err})"
            if providers == "cuda":
                raise ArtifactError(f"--providers cuda: {failed}") from err
            self.session = ort.InferenceSession(path, options, ["CPUExecutionProvider"])
        # ONNX Runtime falls back to the CPU silently when CUDA cannot start: say what runs.
        self.provider = self.session.get_providers()[0]
        self.fallback = None
        if asked[0] == "CUDAExecutionProvider" and self.provider != asked[0]:
            why = failed or (
                f"the CUDA provider could not start (running {self.session.get_providers()})"
            )
            if providers == "cuda":
                raise ArtifactError(f"--providers cuda: {why}")
            self.fallback = why
            print(f"warning: --providers auto: {why}; serving on the CPU", file=sys.stderr)
        self.input_name = self.artifact["input"]["name"]
        self.input_shape = tuple(self.artifact["input"]["shape"][1:])
        crop = self.artifact["preprocess"].get("crop")
        if crop is not None and self.input_shape[1:] != (crop, crop):
            # Decoded images would not fit the graph, and an image request batched with a
            # tensor request would fail every request of that batch.
            raise ArtifactError(
                f"{path}: the preprocessing crops images to {crop} x {crop}, the graph takes "
                f"{list(self.input_shape)}"
            )
        self.num_classes = self.artifact["num_classes"]
        rebalance = self.artifact["rebalance"]
        self.tau = float(rebalance.get("tau", 1.0))
        self.rebalanced = rebalance.get("scales") is not None
        names = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(OUTPUTS):
            raise ArtifactError(f"{path}: graph outputs {names}, expected {list(OUTPUTS)}")

    def warm_up(self, sizes) -> float:
        """Run each batch size once (the CUDA provider tunes and allocates for each input shape
        on its first run); the seconds it took."""
        start = time.perf_counter()
        for size in sizes:
            self.outputs(np.zeros((size, *self.input_shape), np.float32))
        return time.perf_counter() - start

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """``[logits | raw | re-balanced]`` side by side, [N, 3K]: one array a batch to split."""
        return np.concatenate(self.session.run(list(OUTPUTS), {self.input_name: batch}), axis=1)
