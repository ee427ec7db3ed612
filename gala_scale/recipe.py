"""What a run trains with, built from its config: the model (with its pretrained weights and
fine-tuning policy), the loss, the optimizer and the learning-rate schedule; the trainer wires
them. And the recipe's engineering options, as the fast GPU trainers have them (NVIDIA's
ResNet-50 example, torchvision's classification reference, timm): cuDNN autotuning, NHWC
memory format, ``torch.compile``, fused or foreach SGD, SyncBatchNorm, a weight EMA and the
learning rate scaled with the global batch. Each is a config key (docs/configuration.md); none
changes the algorithm, which ``tests/test_recipe.py`` checks by comparing losses on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gala_scale.config import ConfigError, RunConfig
from gala_scale.losses import Loss, build_loss, spec
from gala_scale.models import create_model, finetune, model_options
from gala_scale.models.heads import cosine_head, load_head
from gala_scale.models.pretrained import load_pretrained


def model(cfg: RunConfig, num_classes: int, say: Callable[[str], None] = print) -> nn.Module:
    """The model with its local pretrained weights, if any, and the fine-tuning policy applied;
    ``say`` reports what was loaded and what trains.

    Every problem (an unknown architecture, a weights file that does not fit, a policy the model
    cannot take) is a configuration error that names the key or the file."""
    m = cfg.model
    try:
        net = create_model(m.name, num_classes=num_classes, **model_options(cfg))
        if m.pretrained:
            done = load_pretrained(net, Path(m.pretrained), m.pretrained_layout)
            head = ", ".join(done["head_left_out"]) or "none"
            say(
                f"pretrained: {done['loaded']} tensors from {m.pretrained}; "
                f"classifier left at its initialisation: {head}"
            )
        elif m.pretrained_layout:
            raise ConfigError("model.pretrained_layout: set, but model.pretrained names no file")
        net = with_head(net, cfg)
        if m.head_from:
            path = Path(m.head_from) / "final" / "model.safetensors"
            if not path.is_file():
                raise ConfigError(f"model.head_from: {path}: missing (a finished stage-2 run)")
            try:
                load_head(net, load_file(path))
            except RuntimeError as err:  # another shape: another backbone or label space
                raise ConfigError(
                    f"model.head_from: {path} does not fit this head: {err}"
                ) from None
            say(f"head: the classifier of {m.head_from} (linear probe, then fine-tune)")
        frozen = finetune.apply_policy(net, m.finetune, m.trainable_blocks, m.freeze_bn)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if frozen:
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        say(f"finetune {m.finetune}: {trainable:,} parameters train")
    if m.freeze_bn:
        say("model.freeze_bn: every BatchNorm normalises with its stored statistics")
    return net


def with_head(net: nn.Module, cfg: RunConfig) -> nn.Module:
    """``net`` with the head ``model.head`` names (its own linear one, or a cosine one)."""
    return cosine_head(net, *cosine_scale(cfg)) if cfg.model.head == "cosine" else net


def cosine_scale(cfg: RunConfig) -> tuple[float, bool]:
    """The cosine head's scale and whether the loss applies it itself (gala_scale.models.heads):
    the loss's ``loss.scale`` for a loss that has one, else ``model.cosine_scale``."""
    if "scale" in spec(cfg.loss.name).options:
        return cfg.loss.scale, True
    return cfg.model.cosine_scale, False


def loss(cfg: RunConfig, num_classes: int, class_counts: list[int]) -> Loss:
    """The loss ``loss.name`` declares, with its options and what it needs from the data.

    Its own finiteness check is off: the trainer's Guard checks every ``train.log_every``
    steps instead of a device-to-host sync a step."""
    try:
        criterion = build_loss(cfg.loss, num_classes, class_counts)
    except ValueError as err:
        raise ConfigError(f"loss.name: {err}") from None
    criterion.check_finite = False
    return criterion


def schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int):
    """Linear warm-up for ``optim.warmup_epochs``, then cosine decay to 0, by optimizer step.

    The warm-up's first step is at 1/warmup of the peak and its last at the peak; the cosine
    starts at the peak on the step after."""
    steps_per_epoch = max(1, steps_per_epoch // cfg.train.grad_accum_steps)
    total = cfg.train.epochs * steps_per_epoch
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1)
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def channels_last(cfg: RunConfig, cuda: bool) -> bool:
    return cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and cuda)


def set_backends(cfg: RunConfig, cuda: bool) -> None:
    if cuda:
        # Fixed input shapes (drop/pad policy) make the first-step search pay off every step.
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark


def prepare_model(model: nn.Module, cfg: RunConfig, cuda: bool, world: int) -> nn.Module:
    """Memory format and SyncBatchNorm, before the launcher wraps the model."""
    if cfg.train.sync_bn:
        if not cuda:
            raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA; turn it off on the CPU")
        if world > 1:
            model = finetune.sync_batch_norm(model)
    if channels_last(cfg, cuda):
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    return torch.compile(model) if cfg.train.compile else model


def learning_rate(cfg: RunConfig) -> float:
    """``optim.lr``, scaled linearly with the global batch when ``optim.lr_scaling: linear``."""
    if cfg.optim.lr_scaling == "none":
        return cfg.optim.lr
    global_batch = cfg.data.batch_size * cfg.train.grad_accum_steps
    return cfg.optim.lr * global_batch / cfg.optim.base_batch_size


def optimizer(model: nn.Module, cfg: RunConfig, cuda: bool) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters, in timm's parameter groups: one a layer group
    and decay kind, norm and bias parameters without weight decay unless
    ``optim.decay_norm_and_bias`` (gala_scale.models.finetune.param_groups)."""
    o = cfg.optim
    impl = o.implementation if o.implementation != "auto" else ("fused" if cuda else "foreach")
    kernels = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {}}[impl]
    if impl == "for_loop":
        kernels = {"foreach": False}
    lr = learning_rate(cfg)
    params = finetune.param_groups(
        model, lr, o.weight_decay, o.layer_decay, o.head_lr_scale, o.decay_norm_and_bias
    )
    if o.name == "adamw":
        betas = tuple(o.betas)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=o.weight_decay, **kernels)
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        **kernels,
    )


class WeightEMA(nn.Module):
    """An exponential moving average of the weights and buffers, updated every optimizer step.

    Saved and restored with the checkpoint (``accelerator.register_for_checkpointing``); its
    ``module`` is what evaluation, ``best/`` and ``final/`` use when ``train.ema_decay`` > 0.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.average = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )

    @property
    def module(self) -> nn.Module:
        return self.average.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.average.update_parameters(model)  # foreach lerp on the device; no sync
