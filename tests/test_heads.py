"""The cosine classifier head (model.head: cosine) and where it goes."""

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import debug_overrides, explain, onnx_test_top1, results, run_single

from gala_scale import recipe
from gala_scale.config import load_config
from gala_scale.export import export
from gala_scale.models.heads import CosineLinear
from gala_scale.models.pretrained import head_module


def reference_cosines(x, weight):
    out = torch.empty(x.shape[0], weight.shape[0])
    for b in range(x.shape[0]):
        for k in range(weight.shape[0]):
            out[b, k] = (x[b] @ weight[k]) / (x[b].norm() * weight[k].norm())
    return out


@pytest.mark.parametrize("loss_scales", [True, False])
def test_cosine_head_trains_on_cosines_or_scaled_ones_and_evaluates_scaled(loss_scales):
    torch.manual_seed(0)
    head, x = CosineLinear(5, 3, scale=30.0, loss_scales=loss_scales), torch.randn(4, 5) * 7
    cosines = reference_cosines(x, head.weight.detach())
    head.train()
    torch.testing.assert_close(head(x), cosines if loss_scales else 30 * cosines)
    head.eval()
    torch.testing.assert_close(head(x), 30 * cosines)
    with pytest.raises(ValueError, match="scale > 0"):
        CosineLinear(5, 3, scale=0.0, loss_scales=False)


def config(*overrides):
    return load_config(None, ["data.shards=x", "model.head=cosine", *overrides])


@pytest.mark.parametrize("name", ["resnet32", "timm/efficientnet_lite0"])
def test_the_recipe_puts_a_cosine_head_of_the_losss_scale_in_place_of_the_linear_one(name):
    net = recipe.model(config(f"model.name={name}", "loss.name=ldam_drw"), 7, say=lambda _: None)
    head = head_module(net)
    assert isinstance(head, CosineLinear) and head.weight.shape[0] == 7
    assert head.scale == 30.0 and head.loss_scales
    assert not any(isinstance(m, torch.nn.Linear) for m in net.modules())
    ce = recipe.model(config("loss.name=ce", "model.cosine_scale=16"), 7, say=lambda _: None)
    assert head_module(ce).scale == 16.0 and not head_module(ce).loss_scales


def test_a_scale_the_loss_cannot_give_or_contradicts_is_a_config_error():
    with pytest.raises(
        ValueError, match=r"model\.cosine_scale: 0 takes the loss's scale, and loss 'ce'"
    ):
        config("loss.name=ce")
    with pytest.raises(ValueError, match=r"model\.cosine_scale: loss 'gcl' scales the cosines"):
        config("loss.name=gcl", "model.cosine_scale=10")
    with pytest.raises(ValueError, match=r"model\.head: 'arc' is not one of linear, cosine"):
        config("model.head=arc", "loss.name=gcl")


@pytest.mark.slow
def test_a_cosine_head_run_trains_tests_and_exports(synthetic_shards, tmp_path):
    """LDAM-DRW on a cosine head from scratch: it finishes, and the ONNX graph export checks
    against torch scores the test images as the trainer did (stage 2 on a cosine head:
    tests/test_sweep.py)."""
    run_dir = tmp_path / "run"
    extra = ["model.head=cosine", "loss.name=ldam_drw", "train.epochs=2", "optim.warmup_epochs=0"]
    proc = run_single(debug_overrides(synthetic_shards, run_dir, *extra))
    assert proc.returncode == 0, explain(proc)
    tests = results(run_dir)["test"]
    assert not any(k.startswith("tau-norm") for k in tests)  # no linear weights to normalise
    export(run_dir, tmp_path / "export", "best")  # checks ONNX Runtime against torch
    top1, images = onnx_test_top1(tmp_path / "export", synthetic_shards)
    assert images == results(run_dir)["test_samples"]
    assert top1 == pytest.approx(tests["plain"]["top1"], abs=2 / images)


@pytest.mark.parametrize("standardized", [False, True])
def test_lp_ft_starts_the_head_from_a_stage_2_classifier(tmp_path, standardized):
    torch.manual_seed(0)
    fc = torch.nn.Linear(64, 7)  # ResNet-32's 64 features
    mean, std = torch.randn(64), torch.rand(64) + 0.5
    if standardized:
        weights = {"fc.weight": fc.weight, "fc.bias": fc.bias, "mean": mean, "std": std}
    else:
        weights = {"weight": fc.weight, "bias": fc.bias}
    (tmp_path / "final").mkdir()
    save_file(
        {k: v.detach().contiguous() for k, v in weights.items()},
        tmp_path / "final" / "model.safetensors",
    )
    said, cfg = [], load_config(None, ["data.shards=x", f"model.head_from={tmp_path}"])
    net = recipe.model(cfg, 7, said.append)
    x = torch.randn(3, 64)
    want = fc((x - mean) / std) if standardized else fc(x)
    torch.testing.assert_close(net.fc(x), want, atol=1e-4, rtol=1e-4)
    assert any("linear probe, then fine-tune" in line for line in said)
    with pytest.raises(ValueError, match=r"model\.head_from: .* does not fit this head"):
        recipe.model(cfg, 5)
    with pytest.raises(ValueError, match=r"model\.head_from: .*missing"):
        recipe.model(load_config(None, ["data.shards=x", "model.head_from=/nonexistent"]), 7)
