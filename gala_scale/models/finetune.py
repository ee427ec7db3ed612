"""What a run trains of a model (``model.finetune``) and the learning rate of each part.

A model is a list of layer groups from the input to the head: a timm model's own fine grouping
(``group_matcher``: the stem, then each block), the project's models their stem, each block of
their stages and their head. On them:

* ``full``: everything trains.
* ``linear``: only the head trains; every other parameter is frozen and every BatchNorm outside
  the head stays in eval mode (its running statistics neither used from the batch nor updated),
  whatever ``model.train()`` says.
* ``last_k``: the last ``model.trainable_blocks`` groups before the head and the head train; the
  rest is frozen as with ``linear``.

``model.freeze_bn`` keeps every BatchNorm in eval mode, the trained ones too (their scale and
shift still learn): the features then are those a linear probe was fitted on, so a head taken from
a stage-2 run (``model.head_from``, LP-FT) starts where its probe ended instead of on features
normalised by each batch's own statistics.

The optimizer's parameter groups (:func:`param_groups`, timm's ``param_groups_layer_decay``)
give group i of n the learning rate ``lr * layer_decay ** (n - 1 - i)`` (layer-wise decay: the
head at ``lr``, each group nearer the input ``layer_decay`` times less) and the head
``head_lr_scale`` times more; norm and bias parameters get no weight decay; frozen parameters are
left out.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from torch import nn

POLICIES = ("full", "linear", "last_k")
HELD = "_gala_held_statistics"  # the attribute that marks a BatchNorm whose statistics are held


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group, from the input to the head (the head is last)."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=False))
        return [groups[k] for k in sorted(groups)]
    groups: list[list[str]] = []
    in_stem = True  # leading modules that are not a stage are the stem, one group
    for name, child in model.named_children():
        stage = isinstance(child, nn.Sequential) and name != "stem"
        parts = list(child.named_children()) if stage else [("", child)]
        for sub, module in parts:
            prefix = f"{name}.{sub}." if sub else f"{name}."
            names = [prefix + n for n, _ in module.named_parameters()]
            if not names:
                continue
            if in_stem and not stage and groups:
                groups[-1] += names
            else:
                groups.append(names)
        in_stem = in_stem and not stage
    if not groups:  # a module without children (a bare linear classifier): one group
        groups.append([n for n, _ in model.named_parameters()])
    return groups


def apply_policy(
    model: nn.Module, policy: str, trainable_blocks: int = 1, freeze_bn: bool = False
) -> list[str]:
    """Freeze what ``policy`` leaves out and, with ``freeze_bn``, every BatchNorm's statistics
    (see the module docstring); returns the frozen parameters' names."""
    if policy not in POLICIES:
        raise ValueError(f"model.finetune: unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    frozen: set[str] = set()
    if policy != "full":
        groups = layer_groups(model)
        keep = 1 if policy == "linear" else 1 + trainable_blocks
        if policy == "last_k" and not 1 <= trainable_blocks < len(groups):
            raise ValueError(
                f"model.trainable_blocks: {trainable_blocks} is not in 1..{len(groups) - 1} "
                f"(the model has {len(groups) - 1} groups before its head)"
            )
        frozen = {n for group in groups[:-keep] for n in group}
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
    held = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        owned = [f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)]
        if freeze_bn or (owned and set(owned) <= frozen):
            held.add(name)
    _hold_statistics(model, held)
    return sorted(frozen)


def held_batch_norms(model: nn.Module) -> set[str]:
    """Names of the BatchNorms whose statistics :func:`apply_policy` holds."""
    return {name for name, module in model.named_modules() if getattr(module, HELD, False)}


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` with SyncBatchNorm in place of every BatchNorm, the held ones still held.

    timm's converter, not torch's: torch's turns timm's fused BatchNorm + activation layers
    (``BatchNormAct2d``) into a bare SyncBatchNorm and drops their activation. Either builds new
    modules, without the hooks that hold statistics, so they are set again by name."""
    from timm.layers import convert_sync_batchnorm

    held = held_batch_norms(model)
    model = convert_sync_batchnorm(model)
    _hold_statistics(model, held)
    return model


def _hold_statistics(model: nn.Module, names: set[str]) -> None:
    for name, module in model.named_modules():
        if name in names:
            module.register_forward_pre_hook(_stay_in_eval)
            setattr(module, HELD, True)


def _stay_in_eval(module: nn.Module, _inputs) -> None:
    # model.train() sets every module's flag each epoch; a frozen BatchNorm takes it back
    # before each call, so it normalises with its stored statistics and never updates them.
    module.train(False)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    head_lr_scale: float,
    decay_norm_and_bias: bool = False,
) -> list[dict]:
    """Optimizer groups of the trainable parameters: timm's ``param_groups_layer_decay`` over
    :func:`layer_groups` (one group a layer group and decay kind), each with its ``lr``.

    Weight decay skips one-dimensional parameters (norm scales and shifts, biases) unless
    ``decay_norm_and_bias``; the head's learning rate is ``head_lr_scale`` times its own.
    """
    from timm.optim import param_groups_layer_decay

    # timm warns that layer decay does nothing for a model of one layer group (a stage-2
    # classifier), whatever layer_decay is: true, and not worth a line in every such run.
    logging.getLogger("timm.optim._param_groups").setLevel(logging.ERROR)

    groups = layer_groups(model)
    layer = {name: i for i, names in enumerate(groups) for name in names}
    last = len(groups) - 1  # the head, and any parameter no group names
    head = {id(p) for n, p in model.named_parameters() if layer.get(n, last) == last}
    grouped = SimpleNamespace(  # timm reads only these two of a model
        named_parameters=model.named_parameters,
        group_matcher=lambda coarse=False: lambda name: layer.get(name, last),
    )
    out = param_groups_layer_decay(
        grouped,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        weight_decay_exclude_1d=not decay_norm_and_bias,
    )
    for group in out:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1, "a parameter group mixes the head and other layers"
        group["lr"] = lr * group.pop("lr_scale") * (head_lr_scale if in_head.pop() else 1.0)
    return out
