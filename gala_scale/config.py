"""Typed run configuration: dataclass defaults <- YAML file <- ``key=value`` overrides.

Every field has a one-line description (the ``help`` metadata); ``python -m gala_scale.train
--help-config`` prints them all. Unknown keys and ill-typed values are reported together, each
with its dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gala_scale import losses


def _f(default: Any, help: str, **kwargs) -> Any:
    if isinstance(default, list):  # a fresh list for every config (hence RUF009's noqa below)
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class DataConfig:
    shards: str = _f("", "shard set folder (python -m gala_scale.shards build ...)")
    preset: str = _f(
        "auto",
        "image preset: cifar | imagenet | auto (a timm model's pretrained config, else cifar)",
    )
    input_size: int = _f(0, "the model's input side in pixels, 0 = the preset's")
    mean: list[float] = _f([], "per-channel mean (3 floats), [] = the preset's")  # noqa: RUF009
    std: list[float] = _f([], "per-channel std (3 floats), [] = the preset's")  # noqa: RUF009
    crop_pct: float = _f(0.0, "eval: centre crop / resized side (1 = no cut), 0 = the preset's")
    loader: str = _f("auto", "input pipeline: auto (= dali) | dali | torch")
    batch_size: int = _f(64, "global training batch, split evenly over the processes")
    eval_batch_size: int = _f(256, "global evaluation batch")
    num_workers: int = _f(2, "DALI threads or DataLoader workers per process")
    autoaugment: bool = _f(False, "AutoAugment CIFAR-10 policy (cifar preset)")
    cutout: int = _f(0, "Cutout square side in pixels, 0 = off")
    color_jitter: float = _f(0.0, "brightness/contrast/saturation jitter strength, 0 = off")
    randaugment: bool = _f(False, "RandAugment (2 operations, magnitude 9 of 30)")
    mixup: float = _f(0.0, "mixup Beta(a, a) alpha, 0 = off (soft targets: GALA's soft ledger)")
    cutmix: float = _f(0.0, "CutMix Beta(a, a) alpha, 0 = off")
    mix_prob: float = _f(1.0, "chance that a training batch is mixed (mixup or CutMix on)")
    mix_switch_prob: float = _f(0.5, "with mixup and CutMix both on: chance of CutMix")
    train_split: str = _f("train", "split to train on")
    val_split: str = _f("val", "split for model selection and PN fitting ('' = none)")
    test_split: str = _f("test", "split reported at the end ('' = none)")
    verify: bool = _f(
        True,
        "sha256 of the shards a run reads against the manifest before it trains (split over "
        "the processes; once a run, redone only for files that changed)",
    )


@dataclass
class ModelConfig:
    name: str = _f(
        "resnet32", "registered model name (gala_scale.models.MODELS) or timm/<architecture>"
    )
    pretrained: str = _f(
        "", "local weights file (safetensors or torch checkpoint), '' = none; never downloaded"
    )
    pretrained_layout: str = _f(
        "", "key map of a file from another code base: torchvision | efficientnet_pytorch"
    )
    finetune: str = _f(
        "full", "full | linear (frozen backbone, BatchNorm in eval) | last_k (and the last blocks)"
    )
    trainable_blocks: int = _f(1, "last_k: layer groups before the head that train")
    freeze_bn: bool = _f(
        False, "every BatchNorm normalises with its stored statistics, the trained ones too"
    )
    bn_eps: float = _f(
        0.0, "timm models: BatchNorm epsilon, 0 = the architecture's (TF weights: 1e-3)"
    )
    head: str = _f("linear", "classifier head: linear | cosine (normalised, no bias)")
    head_from: str = _f(
        "", "a finished stage-2 run whose trained classifier starts this run's head (LP-FT)"
    )
    cosine_scale: float = _f(
        0.0, "cosine head: logit scale; 0 = loss.scale, for the losses with one (ldam, gcl)"
    )


def _loss_config() -> type:
    """The ``loss`` section: ``name`` and every registered loss's options, from their one
    declaration (gala_scale.losses); each option's help names the losses that take it."""
    fields = [("name", "str", _f("gala", "the loss: " + " | ".join(losses.specs())))]
    for key, option in losses.options().items():
        users = ", ".join(losses.option_users(key))
        kind = type(option.default).__name__
        fields.append((key, kind, _f(option.default, f"{users}: {option.describe()}")))
    return dataclasses.make_dataclass("LossConfig", fields)


LossConfig = _loss_config()


@dataclass
class OptimConfig:
    name: str = _f("sgd", "sgd | adamw")
    lr: float = _f(0.05, "peak learning rate (of the head, before head_lr_scale)")
    momentum: float = _f(0.9, "SGD momentum")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")  # noqa: RUF009
    head_lr_scale: float = _f(1.0, "the head's learning rate is lr x this")
    layer_decay: float = _f(
        1.0, "layer-wise decay: each layer group nearer the input gets this times less lr"
    )
    weight_decay: float = _f(5e-4, "weight decay")
    decay_norm_and_bias: bool = _f(
        False, "weight decay on norm and bias parameters too (off: the field's practice)"
    )
    nesterov: bool = _f(False, "Nesterov momentum")
    warmup_epochs: float = _f(2.0, "linear warm-up before the cosine decay")
    implementation: str = _f(
        "auto", "SGD kernels: auto (fused on CUDA, foreach on CPU) | fused | foreach | for_loop"
    )
    lr_scaling: str = _f(
        "none", "none | linear: lr x (batch_size x grad_accum_steps) / base_batch_size"
    )
    base_batch_size: int = _f(256, "the global batch at which optim.lr is given (lr_scaling)")


@dataclass
class TrainConfig:
    epochs: int = _f(200, "training epochs")
    eval_every: int = _f(1, "evaluate on the val split every N epochs (0 = only at the end)")
    sync_every_steps: int = _f(0, "also sync the GALA ledger every N steps (0 = epoch ends only)")
    checkpoint_every: int = _f(1, "checkpoint every N epochs")
    keep_checkpoints: int = _f(2, "newest epoch checkpoints kept")
    device: str = _f("auto", "auto (CUDA when present) | cpu | cuda")
    precision: str = _f(
        "auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | no; weights stay fp32"
    )
    grad_accum_steps: int = _f(1, "micro-batches an optimizer step (data.batch_size each)")
    cudnn_benchmark: bool = _f(True, "let cuDNN time its convolution algorithms (fixed shapes)")
    channels_last: str = _f(
        "auto", "NHWC memory format for model and input: auto (on with CUDA) | on | off"
    )
    compile: bool = _f(False, "torch.compile the model (first steps slower while it compiles)")
    sync_bn: bool = _f(False, "BatchNorm statistics over all ranks (SyncBatchNorm; CUDA only)")
    ema_decay: float = _f(
        0.0,
        "keep an exponential moving average of the weights (e.g. 0.9998); 0 = off. "
        "Evaluation, best/ and final/ then use the average",
    )
    log_every: int = _f(
        20, "steps between progress updates and the stop/non-finite check (the one sync point)"
    )
    emulate_world: int = _f(1, "one process consumes the batches of N ranks (a check for tests)")
    tracker: str = _f(
        "tensorboard",
        "where metrics go besides metrics.jsonl, through Accelerate's trackers: tensorboard "
        "(<run_dir>/tb) | mlflow | wandb | trackio | aim | comet_ml | clearml | dvclive | swanlab "
        "(installed, configured their own way, e.g. MLFLOW_TRACKING_URI) | none",
    )


@dataclass
class PNConfig:
    tau: float = _f(1.0, "PN exponent used when fit_tau is off")
    fit_tau: bool = _f(False, "choose tau on the val split (grid 0..2)")


@dataclass
class Stage2Config:
    enabled: bool = _f(
        False, "re-train the classifier on cached frozen features (docs/training.md)"
    )
    from_run: str = _f(
        "", "a finished run whose backbone gives the features ('' = model.pretrained)"
    )
    from_weights: str = _f("final", "final | best: which weights of stage2.from_run")
    views: int = _f(0, "augmented training views cached beside the eval-transform view")
    skip_plain_view: bool = _f(False, "with views > 0: train on the augmented views only")
    sampler: str = _f("instance", "instance | class_balanced | sqrt (class drawn as sqrt(count))")
    reset_head: bool = _f(True, "start from a fresh classifier (false: the backbone's own)")
    cache: str = _f("", "feature cache folder ('' = <from_run or run_dir>/features)")
    standardize: bool = _f(
        False, "train on features standardised per dimension (folded into the head at export)"
    )


@dataclass
class RunConfig:
    run_dir: str = _f("runs/debug", "run directory (config, metrics, checkpoints, plots)")
    seed: int = _f(0, "seed of data order, augmentation and initialisation")
    num_classes: int = _f(0, "classes; 0 = read from the shard set's manifest")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pn: PNConfig = field(default_factory=PNConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)


CHOICES = {
    "data.preset": ("auto", "cifar", "imagenet"),
    "model.finetune": ("full", "linear", "last_k"),
    "model.head": ("linear", "cosine"),
    "model.pretrained_layout": ("", "torchvision", "efficientnet_pytorch"),
    "optim.name": ("sgd", "adamw"),
    "stage2.from_weights": ("final", "best"),
    "stage2.sampler": ("instance", "class_balanced", "sqrt"),
    "data.loader": ("auto", "dali", "torch"),
    "loss.name": tuple(losses.specs()),
    "train.device": ("auto", "cpu", "cuda"),
    "train.channels_last": ("auto", "on", "off"),
    "optim.implementation": ("auto", "fused", "foreach", "for_loop"),
    "optim.lr_scaling": ("none", "linear"),
    "train.precision": ("auto", "bf16", "no"),
    "train.tracker": (
        "tensorboard",
        "mlflow",
        "wandb",
        "trackio",
        "aim",
        "comet_ml",
        "clearml",
        "dvclive",
        "swanlab",
        "none",
    ),
}
POSITIVE = (
    "data.batch_size",
    "data.eval_batch_size",
    "train.epochs",
    "train.log_every",
    "train.emulate_world",
    "train.keep_checkpoints",
    "train.checkpoint_every",
    "train.grad_accum_steps",
    "optim.base_batch_size",
    "model.trainable_blocks",
)
TRIPLES = ("data.mean", "data.std")  # [] or 3 numbers


class ConfigError(ValueError):
    """One or more configuration problems, each naming its key."""


def _check_type(value: Any, annotation: Any, key: str) -> tuple[Any, str | None]:
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(annotation, annotation)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), None
    if kind is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot, no sign) as a string; accept it as the number it means.
        try:
            return float(value), None
        except ValueError:
            pass
    if kind is str and isinstance(value, bool):
        # YAML 1.1 reads no/off as false and on/yes as true: take the spelling the key offers.
        spellings = ("on", "yes", "true") if value else ("off", "no", "false")
        for word in spellings:
            if word in CHOICES.get(key, ()):
                return word, None
    if annotation == "list[float]":
        numbers = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        )
        if not numbers:
            return value, f"{key}: expected a list of numbers, got {value!r}"
        return [float(v) for v in value], None
    if kind in (str, int, float, bool):
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value, None
        return value, f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
    return value, None


def _merge(obj: Any, values: dict, prefix: str, errors: list[str]) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            errors.append(f"{key}: unknown key; valid here: {', '.join(sorted(fields))}")
            continue
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                errors.append(f"{key}: expected a mapping, got {value!r}")
            else:
                _merge(current, value, f"{key}.", errors)
            continue
        value, problem = _check_type(value, fields[name].type, key)
        if problem:
            errors.append(problem)
        else:
            setattr(obj, name, value)


def _nest(dotted: str, value: Any) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _validate(cfg: RunConfig, errors: list[str]) -> None:
    for key, choices in CHOICES.items():
        value = get(cfg, key)
        if value not in choices:
            errors.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        if get(cfg, key) < 1:
            errors.append(f"{key}: must be >= 1, got {get(cfg, key)}")
    if not cfg.data.shards:
        errors.append("data.shards: required (a shard set folder)")
    for key, option in losses.options().items():
        problem = option.problem(f"loss.{key}", getattr(cfg.loss, key))
        if problem:
            errors.append(problem)
    _check_model_name(cfg.model.name, errors)
    for key in ("optim.lr", "optim.head_lr_scale"):
        if get(cfg, key) <= 0:
            errors.append(f"{key}: must be > 0, got {get(cfg, key)}")
    if cfg.optim.warmup_epochs < 0:
        errors.append(f"optim.warmup_epochs: must be >= 0, got {cfg.optim.warmup_epochs}")
    elif cfg.optim.warmup_epochs and cfg.optim.warmup_epochs >= cfg.train.epochs:
        errors.append(
            f"optim.warmup_epochs: {cfg.optim.warmup_epochs} is not below train.epochs "
            f"{cfg.train.epochs}, so the cosine decay would never start (lower it, or 0)"
        )
    if not 0 < cfg.optim.layer_decay <= 1:
        errors.append(f"optim.layer_decay: must be in (0, 1], got {cfg.optim.layer_decay}")
    for key in TRIPLES:
        if len(get(cfg, key)) not in (0, 3):
            errors.append(f"{key}: give 3 numbers (one a channel) or [], got {get(cfg, key)}")
    if any(s <= 0 for s in cfg.data.std):
        errors.append(f"data.std: must be > 0, got {cfg.data.std}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        errors.append(f"optim.betas: give 2 numbers in [0, 1), got {cfg.optim.betas}")
    for key in ("data.mixup", "data.cutmix"):
        if get(cfg, key) < 0:
            errors.append(f"{key}: must be >= 0 (0 = off), got {get(cfg, key)}")
    for key in ("data.mix_prob", "data.mix_switch_prob"):
        if not 0 <= get(cfg, key) <= 1:
            errors.append(f"{key}: must be in [0, 1], got {get(cfg, key)}")
    if cfg.model.cosine_scale < 0:
        errors.append(f"model.cosine_scale: must be >= 0, got {cfg.model.cosine_scale}")
    elif cfg.model.head == "cosine":
        own = "scale" in losses.spec(cfg.loss.name).options
        if own and cfg.model.cosine_scale not in (0, cfg.loss.scale):
            errors.append(
                f"model.cosine_scale: loss {cfg.loss.name!r} scales the cosines by its "
                f"loss.scale ({cfg.loss.scale}); leave this 0 or set loss.scale"
            )
        elif not own and not cfg.model.cosine_scale:
            errors.append(
                f"model.cosine_scale: 0 takes the loss's scale, and loss {cfg.loss.name!r} has "
                "none (set a scale, e.g. 16, or use ldam, ldam_drw or gcl)"
            )
    if cfg.stage2.views < 0:
        errors.append(f"stage2.views: must be >= 0, got {cfg.stage2.views}")
    if cfg.stage2.enabled and cfg.data.cutmix:
        errors.append("data.cutmix: cuts images, and stage 2 trains on features (use data.mixup)")
    if cfg.stage2.skip_plain_view and not cfg.stage2.views:
        errors.append("stage2.skip_plain_view: needs stage2.views > 0")
    if cfg.data.input_size < 0:
        errors.append(f"data.input_size: must be >= 0, got {cfg.data.input_size}")
    if not 0.0 <= cfg.data.color_jitter < 1.0:
        errors.append(f"data.color_jitter: must be in [0, 1), got {cfg.data.color_jitter}")
    if cfg.data.autoaugment and cfg.data.preset not in ("cifar", "auto"):
        errors.append(
            f"data.autoaugment: the CIFAR policy, for data.preset cifar (not {cfg.data.preset})"
        )
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        errors.append(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")


def _check_model_name(name: str, errors: list[str]) -> None:
    from gala_scale.models import check_name  # torch and timm: only once the rest is valid

    try:
        check_name(name)
    except ValueError as err:
        errors.append(f"model.name: {err}".replace("model.name: model.name: ", "model.name: "))


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cfg) or part not in {
            f.name for f in dataclasses.fields(cfg)
        }:
            raise ConfigError(f"{dotted}: unknown key (python -m gala_scale.train --help-config)")
        cfg = getattr(cfg, part)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None
) -> RunConfig:
    """Defaults <- YAML at ``path`` (or a ``values`` tree) <- ``key.sub=value`` overrides."""
    cfg, errors = RunConfig(), []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(err)})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if values:
        _merge(cfg, values, "", errors)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            errors.append(f"{item!r}: overrides look like key.sub=value")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as err:
            errors.append(f"{key}: {text!r} is not a YAML value ({_one_line(err)})")
            continue
        _merge(cfg, _nest(key, value), "", errors)
    if not errors:
        _validate(cfg, errors)
    if errors:
        raise ConfigError("bad configuration:\n  " + "\n  ".join(errors))
    return cfg


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def shortened(path: str | Path, epochs: int, overrides: list[str] = ()) -> list[str]:
    """Overrides that cut the recipe at ``path`` (with ``overrides``) to ``epochs``; a warm-up
    that the cut would make as long as the run is cut by the same factor (so the run still
    decays), a shorter one kept as it is."""
    cfg = load_config(path, list(overrides))
    if cfg.optim.warmup_epochs < epochs:
        return [f"train.epochs={epochs}"]
    warmup = cfg.optim.warmup_epochs * epochs / cfg.train.epochs
    return [f"train.epochs={epochs}", f"optim.warmup_epochs={warmup:g}"]


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def describe(obj: Any = None, prefix: str = "") -> list[str]:
    """``key (default): help`` lines for every field."""
    obj = RunConfig() if obj is None else obj
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} ({value!r}): {f.metadata.get('help', '')}")
    return lines


__all__ = ["ConfigError", "RunConfig", "describe", "load_config", "shortened", "to_dict"]
