"""Export publishes a whole, checked artifact or nothing; gala-serve refuses a malformed one.

The runs here are made by hand (a config and a weights file, no training), so export runs in
this process; only the test that kills an export starts one.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from gala_serve.model import ArtifactError, Model
from safetensors.torch import save_file
from train_helpers import ENV, ROOT, explain

from gala_scale import models, publish
from gala_scale.export import ExportError, export
from gala_scale.models.tiny import TinyNet


class FrozenBranchNet(TinyNet):
    """TinyNet with a Python branch on its input: the tracer keeps the branch that the export's
    all-zero example takes, so on real images the graph answers ``logits`` where torch answers
    ``-logits`` (the data-dependent control flow that a TracerWarning is about, and that the
    export's ONNX Runtime comparison is there to catch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if bool((x == 0).all()) else -logits


def make_run(root: Path, shards: Path, model_name: str, weights_seed: int) -> Path:
    """A run folder as export reads it: the config and best/ weights (and no pn.json, so the PN
    scales are fitted on val at export)."""
    run = root / "run"
    (run / "best").mkdir(parents=True, exist_ok=True)
    values = yaml.safe_load((ROOT / "configs" / "debug.yaml").read_text())
    values["data"]["shards"], values["run_dir"] = str(shards), str(run)
    values["model"]["name"] = model_name
    (run / "config.yaml").write_text(yaml.safe_dump(values))
    torch.manual_seed(weights_seed)
    save_file(TinyNet(num_classes=6).state_dict(), run / "best" / "model.safetensors")
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def beside(out: Path) -> list[str]:
    """What lies beside the artifact folder other than it (temporary folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def first_export(root: Path, shards: Path) -> tuple[Path, Path]:
    """A good export of a hand-made run into ``root/site/export``."""
    run = make_run(root, shards, "tiny", weights_seed=0)
    out = root / "site" / "export"
    export(run, out, "best", triton=True)
    return run, out


@pytest.fixture
def exported(synthetic_shards, tmp_path):
    """A run and its artifact, for a test to change."""
    return first_export(tmp_path, synthetic_shards)


@pytest.fixture(scope="module")
def good(synthetic_shards, tmp_path_factory):
    """A run and its artifact, only read."""
    return first_export(tmp_path_factory.mktemp("good"), synthetic_shards)


def test_a_failed_check_leaves_the_previous_artifact_byte_for_byte(
    exported, synthetic_shards, tmp_path, monkeypatch
):
    run, out = exported
    before, around = snapshot(out), beside(out)
    assert {"model.onnx", "artifact.json", "triton/gala/1/model.onnx"} <= set(before)
    # Other weights (so a new graph differs from the old one) in a model whose graph disagrees
    # with torch on real images: the ONNX Runtime comparison fails for real.
    monkeypatch.setitem(models.MODELS, "frozen_branch", FrozenBranchNet)
    make_run(tmp_path, synthetic_shards, "frozen_branch", weights_seed=1)
    with pytest.raises(ExportError, match="ONNX Runtime and torch disagree"):
        export(run, out, "best", triton=True)
    assert snapshot(out) == before
    assert beside(out) == around  # its temporary folder went with it


def export_in_a_process(script: str, run, out) -> subprocess.CompletedProcess:
    """``python -c script --run RUN --out OUT``: an export with a fault planted by ``script``."""
    return subprocess.run(
        [sys.executable, "-c", script, "--run", str(run), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


KILLED_AFTER_THE_GRAPH = """
import os, signal, sys
from gala_scale import export

def killed(*args, **kwargs):  # the graph is on disk; the process dies before the check
    os.kill(os.getpid(), signal.SIGKILL)

export.compare_with_torch = killed
sys.exit(export.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_export_leaves_the_previous_artifact_and_the_next_cleans_up(
    exported, synthetic_shards, tmp_path
):
    run, out = exported
    before, around = snapshot(out), beside(out)
    make_run(tmp_path, synthetic_shards, "tiny", weights_seed=1)  # new weights: a new graph
    proc = export_in_a_process(KILLED_AFTER_THE_GRAPH, run, out)
    assert proc.returncode == -9, explain(proc)
    assert snapshot(out) == before
    left = [name for name in beside(out) if name not in around]
    assert len(left) == 1 and (out.parent / left[0] / "model.onnx").is_file()  # killed mid-way

    artifact = export(run, out, "best")  # the next export: publishes and cleans the leftover
    assert beside(out) == around
    assert json.loads((out / "artifact.json").read_text()) == json.loads(json.dumps(artifact))
    assert (out / "model.onnx").read_bytes() != before["model.onnx"]
    assert not (out / "triton").exists()  # the whole folder is this export's, nothing older


def test_export_refuses_to_replace_a_folder_that_is_not_an_artifact(good, tmp_path):
    run, _ = good
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"notes\.txt"):
        export(run, out, "best")
    assert snapshot(out) == {"notes.txt": b"mine"}


CORRUPTIONS = {
    "not JSON": ('{"format_version": 2, "onnx": ', "JSON"),
    "not an object": ("[1, 2, 3]", "JSON object"),
    "num_classes a string": ({"num_classes": "6"}, "num_classes"),
    "class_names a number": ({"class_names": 6}, "class_names"),
    "class_names too few": ({"class_names": ["a"]}, "class_names"),
    "rebalance a list": ({"rebalance": []}, "rebalance"),
    "scales a string": ({"rebalance": {"scales": "abc", "tau": 1.0}}, "rebalance.scales"),
    "tau a string": ({"rebalance": {"scales": None, "tau": "1"}}, "rebalance.tau"),
    "input name a number": ({"input": {"name": 5}}, "input.name"),
    "input shape a string": ({"input": {"name": "input", "shape": "x"}}, "input.shape"),
    "outputs a mapping": ({"outputs": {"logits": 1}}, "outputs"),
    "preprocess a string": ({"preprocess": "cifar"}, "preprocess"),
    "crop a string": ({"preprocess": {"crop": "32"}}, "preprocess.crop"),
    "mean of one number": ({"preprocess": {"mean": [0.5]}}, "preprocess.mean"),
    "onnx a number": ({"onnx": 5}, "onnx"),
    "onnx missing on disk": ({"onnx": "other.onnx"}, "onnx"),
    "train_class_counts of strings": ({"train_class_counts": ["1"] * 6}, "train_class_counts"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_malformed_artifact_json_is_an_artifact_error_naming_file_and_field(good, tmp_path, name):
    folder = tmp_path / "copy"
    shutil.copytree(good[1], folder)
    change, field = CORRUPTIONS[name]
    path = folder / "artifact.json"
    if isinstance(change, str):
        path.write_text(change)
    else:
        doc = json.loads(path.read_text())
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError) as raised:
        Model(folder, providers="cpu")
    message = str(raised.value)
    assert str(path) in message and field in message, message


def test_the_good_artifact_loads(good):
    model = Model(good[1], providers="cpu")
    assert model.num_classes == 6 and model.input_shape == (3, 32, 32)


def test_without_the_exchange_the_folder_is_still_replaced_whole(
    exported, synthetic_shards, tmp_path, monkeypatch
):
    """A file system without RENAME_EXCHANGE (some network file systems): renamed aside first."""
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    run, out = exported
    around = beside(out)
    make_run(tmp_path, synthetic_shards, "tiny", weights_seed=1)
    before = snapshot(out)
    export(run, out, "best")
    after = snapshot(out)
    assert after["model.onnx"] != before["model.onnx"] and "triton/gala/config.pbtxt" not in after
    assert beside(out) == around


KILLED_BETWEEN_THE_RENAMES = """
import os, signal, sys
from gala_scale import export, publish

publish._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE
rename = os.rename

def rename_then_die(src, dst):  # the old folder is aside, the new one not yet in place
    rename(src, dst)
    if ".old-" in os.fspath(dst):
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename_then_die
sys.exit(export.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_swap_without_the_exchange_killed_half_way_is_undone_by_the_next_export(
    exported, synthetic_shards, tmp_path
):
    run, out = exported
    before, around = snapshot(out), beside(out)
    make_run(tmp_path, synthetic_shards, "tiny", weights_seed=1)
    proc = export_in_a_process(KILLED_BETWEEN_THE_RENAMES, run, out)
    assert proc.returncode == -9, explain(proc)
    assert not out.exists()  # killed in the window this file system cannot close
    publish.recover(out)  # what the next export does first
    assert snapshot(out) == before and beside(out) == around
    export(run, out, "best")
    assert snapshot(out)["model.onnx"] != before["model.onnx"] and beside(out) == around
