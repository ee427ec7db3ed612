"""A timm backbone end to end: local pretrained weights, last-k fine-tuning with AdamW and layer
decay, export to ONNX with the PN outputs, and gala-serve answering for it unchanged."""

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from gala_serve import preprocess
from PIL import Image
from safetensors.torch import load_file, save_file
from test_serve import running_server
from train_helpers import debug_overrides, explain, run_single

from gala_scale.export import export
from gala_scale.models import create_model
from gala_scale.shards import tario

pytestmark = pytest.mark.slow
ARCH = "timm/test_efficientnet"


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_shards):
    base = tmp_path_factory.mktemp("timm")
    shards = synthetic_shards
    torch.manual_seed(5)
    weights = base / "imagenet.safetensors"  # a 1,000-class "pretrained" file
    save_file(create_model(ARCH, num_classes=1000).state_dict(), weights)
    run_dir = base / "run"
    args = debug_overrides(
        shards,
        run_dir,
        f"model.name={ARCH}",
        f"model.pretrained={weights}",
        "model.finetune=last_k",
        "model.trainable_blocks=2",
        "optim.name=adamw",
        "optim.lr=0.003",
        "optim.weight_decay=0.05",
        "optim.layer_decay=0.7",
        "optim.head_lr_scale=3",
        "data.preset=auto",  # the model's: timm's mean and std, random-resized crops
        "data.input_size=48",
        "data.crop_pct=1.0",
        "train.epochs=2",
    )
    proc = run_single(args)
    assert proc.returncode == 0, explain(proc)
    return shards, weights, run_dir, proc.stdout + proc.stderr


def test_a_timm_run_starts_from_the_file_and_trains_only_its_last_blocks(run):
    _, weights, run_dir, out = run
    source = load_file(weights)
    final = load_file(run_dir / "final" / "model.safetensors")
    assert "pretrained: " in out and "classifier left at its initialisation: classifier.bias" in out
    assert "finetune last_k:" in out
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.1.0.conv_exp.weight"):
        assert torch.equal(final[key], source[key]), key  # frozen, BatchNorm statistics too
    assert not torch.equal(final["conv_head.weight"], source["conv_head.weight"])
    assert not torch.equal(
        final["blocks.3.0.bn1.running_mean"], source["blocks.3.0.bn1.running_mean"]
    )
    assert final["classifier.weight"].shape == (6, source["classifier.weight"].shape[1])
    config = (run_dir / "config.yaml").read_text()
    assert "finetune: last_k" in config and "name: adamw" in config
    assert json.loads((run_dir / "results.json").read_text())["test"]["plain"]["top1"] > 0


def test_a_timm_model_exports_with_pn_and_gala_serve_answers_it(run, tmp_path):
    shards, _, run_dir, _ = run
    out = tmp_path / "export"
    export(run_dir, out, "best")  # raises if ONNX Runtime and torch disagree
    artifact = json.loads((out / "artifact.json").read_text())
    pre = artifact["preprocess"]
    assert pre["crop"] == 48 and pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    model = create_model(ARCH, num_classes=6)
    model.load_state_dict(load_file(run_dir / "best" / "model.safetensors"))
    manifest = json.loads((shards / "manifest.json").read_text())
    tar = shards / manifest["splits"]["test"]["shards"][0]["file"]
    images = [files["jpg"] for _, files in list(tario.iter_tar(tar))[:4]]
    x = np.stack([preprocess.eval_array(Image.open(io.BytesIO(d)), pre) for d in images])
    want = torch.softmax(model.eval()(torch.from_numpy(x)), 1).detach().numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    raw = dict(zip(names, session.run(None, {"input": x}), strict=True))
    np.testing.assert_allclose(raw["raw_probabilities"], want, atol=1e-5)
    with running_server(out, tmp_path / "server.log", "--providers", "cpu") as client:
        for data, row in zip(images, raw["probabilities"], strict=True):
            answer = client.classify(data, top_k=2, full=True)
            np.testing.assert_allclose(answer["probabilities"], row, atol=1e-5)
            assert answer["top_k"][0]["index"] == int(row.argmax())
