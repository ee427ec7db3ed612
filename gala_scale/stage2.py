"""Two-stage (decoupled) training: re-train the classifier on cached, frozen features.

``stage2.enabled: true`` turns a run into stage 2 of a finished run (``stage2.from_run``: its
``final/`` or ``best/`` weights) or of a pretrained backbone (``model.name`` with
``model.pretrained``). The backbone's features (the input of its classifier) are computed once,
through the run's own loaders:

* view 0: every training image through the eval transform (no random augmentation);
* views 1..``stage2.views``: a shuffled training epoch each, through the training pipeline
  (random crops, flips and the configured augmentations), seeded by the view;
* the val and test splits through the eval transform.

They are cached as float16 ``.npy`` files (read memory-mapped, so the ranks of a node share the
pages) in ``stage2.cache`` (default ``<from_run>/features``, or ``<run_dir>/features`` for a
pretrained backbone), one folder per version: ``<cache>/<key hash>/``, named by the hash of
:func:`cache_key`, everything that shapes the features (every config field but those
:data:`KEY_EXCLUDED` names with a reason, the weights' and the shard set's sha256, the number of
processes, the device), which its ``meta.json`` spells out. A later stage-2 run with the same
key reads them and computes nothing, so a sweep over losses and samplers costs seconds. A version
is written under a temporary name and renamed in whole (gala_scale.publish), and never replaced
or removed by a run, so runs sharing the cache each read their own.

Then the trainer runs as in stage 1 on a linear classifier over the features, with any loss (the
GALA ledger, PN, metrics, plots, checkpoints and resumes alike) and a sampler: ``instance``
(every sample once an epoch), ``class_balanced`` (each class drawn equally often) or ``sqrt`` (a
class drawn in proportion to the square root of its count). Its ``final/`` and ``best/`` hold
the classifier; export puts it back on the backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gala_scale import dist, publish
from gala_scale.config import ConfigError, RunConfig
from gala_scale.data import PAD_LABEL, create_loader
from gala_scale.logs import get_logger
from gala_scale.models import create_model, model_options
from gala_scale.models.heads import CosineLinear, replace_head
from gala_scale.models.pretrained import head_module, load_pretrained
from gala_scale.recipe import cosine_scale
from gala_scale.run import Loaders
from gala_scale.shards.tario import sha256
from gala_scale.stages import augmentation, layout, preset

log = get_logger(__name__)
SAMPLERS = ("instance", "class_balanced", "sqrt")
META = "meta.json"
CACHE_FORMAT = 2  # the files of a version and how they are extracted: 2, versions by key hash

_PRESET = "as the input preset the loaders use (auto: the preset it names)"
# Config fields in the key as they resolve rather than as written (the key's own entries).
KEY_RESOLVED = {
    "seed": "only augmented views (stage2.views > 0) depend on it: null without them",
    "data.preset": _PRESET,
    "data.input_size": _PRESET,
    "data.mean": _PRESET,
    "data.std": _PRESET,
    "data.crop_pct": _PRESET,
    "data.loader": "the pipeline that decodes and augments (auto: dali)",
}
_TRAINING = "read by the training loop on the features; extraction never reads it"
# The config fields that do not shape the features, each with why; a section's name covers its
# fields. Every other field is in the key, so a field added to the config later is keyed unless
# someone adds it here with a reason.
KEY_EXCLUDED = {
    "run_dir": "where the run writes; the cache has its own folder (stage2.cache)",
    "num_classes": "must be the manifest's (the run stops otherwise), which is keyed by sha256",
    "data.shards": "a path: the set is keyed by its manifest's sha256 (which lists each shard's "
    "sha256), so a moved set still hits",
    "data.batch_size": "the training batch; extraction reads batches of data.eval_batch_size",
    "data.mixup": "mixes training batches of cached features, after the cache",
    "data.cutmix": "refused in stage 2 (it cuts images)",
    "data.mix_prob": "how training batches are mixed, after the cache",
    "data.mix_switch_prob": "how training batches are mixed, after the cache",
    "data.verify": "a check of the shards against the manifest before a run; changes no byte read",
    "model.pretrained": "a path: the weights are keyed by their sha256",
    "model.finetune": "which layers stage 1 trains; stage 2 freezes the whole backbone",
    "model.trainable_blocks": "which layers stage 1 trains; stage 2 freezes the whole backbone",
    "model.head": "the classifier stage 2 trains on the features (they are the head's input)",
    "model.cosine_scale": "the scale of a cosine classifier trained on the features",
    "loss": "the objective trained on the features",
    "optim": "the optimizer of the training on the features",
    "pn": "fitted on predictions after training",
    "train.device": "the device it resolves to is keyed (cache_key's device), not the words",
    "train.precision": "extraction runs the backbone in fp32 (not the prepared, autocast model)",
    "train.channels_last": "extraction neither converts the backbone nor asks for NHWC batches",
    "train.compile": "the backbone is not compiled for extraction",
    "train.sync_bn": "the frozen backbone's BatchNorm is in eval mode: no batch statistics",
    "train.emulate_world": "virtual training ranks; extraction uses the evaluation layout",
    **dict.fromkeys(
        (
            "train.epochs",
            "train.eval_every",
            "train.sync_every_steps",
            "train.checkpoint_every",
            "train.keep_checkpoints",
            "train.grad_accum_steps",
            "train.ema_decay",
            "train.log_every",
        ),
        _TRAINING,
    ),
    "stage2.enabled": "true wherever the cache is used",
    "stage2.from_run": "a path: the weights it gives are keyed by their sha256",
    "stage2.from_weights": "which weights file: keyed by its sha256",
    "stage2.skip_plain_view": "which cached views training reads; every view is cached",
    "stage2.sampler": "how training draws from the features",
    "stage2.reset_head": "the classifier training starts from",
    "stage2.cache": "the cache's own folder",
    "stage2.standardize": "a transform of the cached features as training reads them",
}


def backbone_weights(cfg: RunConfig) -> Path:
    """The weights file the features come from."""
    s = cfg.stage2
    if s.from_run:
        path = Path(s.from_run) / s.from_weights / "model.safetensors"
        if not path.is_file():
            raise ConfigError(f"stage2.from_run: {path}: missing (did that run finish?)")
        return path
    if not cfg.model.pretrained:
        raise ConfigError("stage2: needs stage2.from_run (a finished run) or model.pretrained")
    return Path(cfg.model.pretrained)


def backbone(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The frozen backbone in eval mode, its classifier included (its input is the feature)."""
    try:
        model = create_model(cfg.model.name, num_classes=num_classes, **model_options(cfg))
        layout = "" if cfg.stage2.from_run else cfg.model.pretrained_layout
        load_pretrained(model, backbone_weights(cfg), layout)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


class Standardized(nn.Module):
    """A linear classifier on standardised features: ``fc((x - mean) / std)``.

    ``mean`` and ``std`` (buffers, saved with the weights) are the training features' own; the
    classifier's optimum is the same affine function as on the raw features, but gradient
    descent reaches it in far fewer epochs (every input dimension on one scale). :meth:`folded`
    gives the equal ``nn.Linear`` on raw features, which export puts on the backbone.
    """

    def __init__(self, fc: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.fc = fc
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x - self.mean) / self.std)

    def folded(self) -> nn.Linear:
        weight = self.fc.weight.detach() / self.std
        out = nn.Linear(weight.shape[1], weight.shape[0])
        out.weight.data.copy_(weight)
        out.bias.data.copy_(self.fc.bias.detach() - weight @ self.mean)
        return out

    def unfold_(self, raw: nn.Linear) -> None:
        """Set ``fc`` so that this module computes what ``raw`` computes on raw features."""
        self.fc.weight.data.copy_(raw.weight.detach() * self.std)
        self.fc.bias.data.copy_(raw.bias.detach() + raw.weight.detach() @ self.mean)


def feature_statistics(features: np.ndarray, rows: int = 65536) -> tuple[torch.Tensor, ...]:
    """Per-dimension mean and standard deviation of ``features`` (float64 sums, in blocks of
    ``rows``: the cache is memory-mapped float16); a constant dimension gets std 1."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for start in range(0, len(features), rows):
        block = np.asarray(features[start : start + rows], dtype=np.float64)
        total += block.sum(0)
        squares += (block**2).sum(0)
    mean = total / len(features)
    std = np.sqrt(np.maximum(squares / len(features) - mean**2, 0.0))
    std[std < 1e-6] = 1.0
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def classifier(
    cfg: RunConfig, num_classes: int, feature_dim: int, statistics: tuple | None = None
) -> nn.Module:
    """The stage-2 classifier: a fresh linear or cosine layer (``model.head``; seeded), or the
    backbone's own linear head with ``stage2.reset_head: false``; on standardised features
    (:class:`Standardized`) when ``statistics`` (mean, std) are given."""
    torch.manual_seed(cfg.seed)
    if cfg.model.head == "cosine":
        fresh = CosineLinear(feature_dim, num_classes, *cosine_scale(cfg))
    else:
        fresh = nn.Linear(feature_dim, num_classes)
    model = fresh if statistics is None else Standardized(fresh, *statistics)
    if not cfg.stage2.reset_head:
        head = head_module(backbone(cfg, num_classes))
        if not isinstance(head, nn.Linear) or head.in_features != feature_dim:
            raise ConfigError("stage2.reset_head: false needs the backbone's head to be Linear")
        if cfg.model.head == "cosine":
            raise ConfigError("stage2.reset_head: false starts from a linear head, not cosine")
        if statistics is None:
            fresh.load_state_dict(head.state_dict())
        else:
            model.unfold_(head)
    return model


def cache_dir(cfg: RunConfig) -> Path:
    s = cfg.stage2
    if s.cache:
        return Path(s.cache)
    return Path(s.from_run or cfg.run_dir) / "features"


def _keyed(name: str) -> bool:
    """Whether a config field is in the key as written."""
    named = [*KEY_EXCLUDED, *KEY_RESOLVED]
    return not any(name == x or name.startswith(f"{x}.") for x in named)


def _leaves(values: dict, prefix: str = "") -> dict:
    """A nested dict flattened to dotted keys."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat |= _leaves(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def cache_key(cfg: RunConfig, weights: Path, processes: int, device: str) -> dict:
    """Everything that shapes the cached features (JSON-ready): every config field that
    :data:`KEY_EXCLUDED` does not name, as written or (:data:`KEY_RESOLVED`) as it resolves, the
    weights' and the shard set's content (sha256), and how many processes extract them on which
    device."""
    d = cfg.data
    config = _leaves(dataclasses.asdict(cfg))
    return {
        "format": CACHE_FORMAT,
        "config": {name: value for name, value in sorted(config.items()) if _keyed(name)},
        "preset": preset(cfg).to_dict(),
        "loader": "dali" if d.loader == "auto" else d.loader,  # as ShardLoader resolves it
        # The eval-transform views are the same for every seed; augmented views are not.
        "seed": cfg.seed if cfg.stage2.views else None,
        "weights_sha256": sha256(weights),
        "manifest_sha256": sha256(Path(d.shards) / "manifest.json"),
        # Each process reads its own shards, in batches of eval_batch_size / processes with its
        # own augmentation draws, and rank 0 gathers them in rank order: the rows differ.
        "processes": processes,
        # DALI decodes on the GPU there (nvJPEG) and on the CPU otherwise.
        "device": device,
    }


def version_folder(cfg: RunConfig, key: dict) -> Path:
    """The folder of the features with ``key``: ``<cache>/<16 hex digits of its sha256>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir(cfg) / digest[:16]


def _holds(folder: Path, key: dict) -> bool:
    """Whether ``folder`` is a published version with ``key``; an error if it is one of
    another key (a damaged folder, or a hash prefix shared by two keys)."""
    if not folder.exists():
        return False
    try:
        held = json.loads((folder / META).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        held = None
    if held != json.loads(json.dumps(key)):  # as the file holds it (lists)
        raise ConfigError(
            f"stage2.cache: {folder} is not the features of this key ({META} missing or "
            "another key's): remove that folder"
        )
    return True


def _names(cfg: RunConfig) -> list[tuple[str, str, int | None]]:
    """(cache name, split, view) of every file: view None is the eval transform."""
    d = cfg.data
    names = [("train_view0", d.train_split, None)]
    names += [(f"train_view{v}", d.train_split, v) for v in range(1, cfg.stage2.views + 1)]
    names += [(split, split, None) for split in (d.val_split, d.test_split) if split]
    return names


@torch.no_grad()
def _extract(model: nn.Module, batches) -> tuple[np.ndarray, np.ndarray] | None:
    """The classifier inputs and labels of every rank's batches, on the main process."""
    seen: list[torch.Tensor] = []
    hook = head_module(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    feats, labels = [], []
    try:
        for images, y in batches:
            seen.clear()
            model(images)
            rows = torch.cat([seen[0].flatten(1).float(), y[:, None].float()], 1)
            gathered = dist.gather_to_main(rows)
            if gathered is None:
                continue
            rows = torch.cat(gathered).cpu()
            keep = rows[:, -1] != PAD_LABEL
            feats.append(rows[keep, :-1].half().numpy())
            labels.append(rows[keep, -1].long().numpy())
    finally:
        hook.remove()
    if dist.rank() != 0:
        return None
    return np.concatenate(feats), np.concatenate(labels)


def _write_features(cfg: RunConfig, accelerator, model: nn.Module, num_classes: int, tmp):
    """Every cache file into ``tmp`` (on the main process; the other ranks send their rows)."""
    d, lay = cfg.data, layout(cfg, accelerator)
    common = {"preset": preset(cfg), "kind": d.loader, "seed": cfg.seed}
    common |= {"rank": lay.eval_rank, "world": lay.eval_world, "device": accelerator.device}
    common |= {"num_workers": d.num_workers, "num_classes": num_classes}
    for name, split, view in _names(cfg):
        train = view is not None
        loader = create_loader(
            d.shards,
            split,
            batch_size=max(1, lay.eval_batch),
            train=train,
            **(augmentation(cfg) if train else {}),
            **common,
        )
        out = _extract(model, loader.epoch(view or 0))
        log.info("stage2 features: %s (%s) computed", name, split)
        if out is not None:
            np.save(tmp / f"{name}.features.npy", out[0])
            np.save(tmp / f"{name}.labels.npy", out[1])


def ensure_cache(cfg: RunConfig, accelerator, num_classes: int) -> Path:
    """The folder of this run's features: the cache's version with this run's key, computed and
    published first unless it is there already.

    A version is written under a temporary name and renamed in whole, and never replaced: where
    another run published the same key meanwhile, that one is kept (the same features) and
    this one dropped. So a run reading its version never sees it change or go."""
    weights = backbone_weights(cfg)
    key = cache_key(cfg, weights, accelerator.num_processes, accelerator.device.type)
    folder = version_folder(cfg, key)
    held = _holds(folder, key) if dist.rank() == 0 else None
    if dist.broadcast_object(held):  # rank 0's view (a run may publish it meanwhile)
        return folder
    model = backbone(cfg, num_classes).to(accelerator.device)
    main = accelerator.is_main_process
    staged = publish.staged(folder, replace=False) if main else contextlib.nullcontext()
    with staged as tmp:
        _write_features(cfg, accelerator, model, num_classes, tmp)
        if main:
            source = {"weights": str(weights), "shards": str(Path(cfg.data.shards).resolve())}
            (tmp / META).write_text(json.dumps({"key": key, "source": source}, indent=1))
    accelerator.wait_for_everyone()
    return folder


class FeatureLoader:
    """Batches of cached features with a loader's interface (``epoch``, ``steps_per_epoch``).

    Training: each epoch an order over the samples (a permutation, or the sampler's draws with
    replacement), the same on every rank (seeded by ``seed`` and the epoch), of which rank r takes
    every ``world``-th; the epoch's view cycles through the cached training views. Evaluation: the
    samples in order, the last batches padded with ``PAD_LABEL``.
    """

    kind = "cache"

    def __init__(
        self,
        views: list[tuple[np.ndarray, np.ndarray]],
        batch_size: int,
        train: bool,
        rank: int,
        world: int,
        seed: int,
        device,
        sampler: str = "instance",
    ) -> None:
        if sampler not in SAMPLERS:
            raise ConfigError(f"stage2.sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        self.views, self.batch_size, self.train = views, batch_size, train
        self.rank, self.world, self.seed, self.device = rank, world, seed, torch.device(device)
        self.sampler = sampler
        # Augmented views can hold a few samples fewer (the training pipeline drops the last
        # partial batch): an epoch takes what the shortest view has.
        total = min(len(labels) for _, labels in views)
        if train:
            self.steps_per_epoch = (total // world) // batch_size
        else:
            self.steps_per_epoch = math.ceil(math.ceil(total / world) / batch_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"stage2: {total} samples are fewer than one batch of {batch_size}")

    def state(self) -> None:
        return None  # the order is a function of (seed, epoch): a resume needs nothing else

    def _order(self, epoch: int, labels: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.sampler == "instance":
            return rng.permutation(len(labels))
        # A class is drawn in proportion to count ** power (0: balanced, 1/2: square root), so
        # each of its samples with weight count ** (power - 1).
        counts = np.bincount(labels)
        power = 0.0 if self.sampler == "class_balanced" else 0.5
        per_class = np.zeros(len(counts))
        per_class[counts > 0] = counts[counts > 0].astype(np.float64) ** (power - 1.0)
        weights = per_class[labels]
        return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features, labels = self.views[epoch % len(self.views)] if self.train else self.views[0]
        if self.train:
            mine = self._order(epoch, labels)[self.rank :: self.world]
        else:
            per_rank = self.steps_per_epoch * self.batch_size
            mine = np.arange(self.rank * per_rank, (self.rank + 1) * per_rank)
        for step in range(start_step, self.steps_per_epoch):
            index = mine[step * self.batch_size : (step + 1) * self.batch_size]
            valid = index[index < len(labels)]
            x = torch.from_numpy(np.asarray(features[valid], dtype=np.float32))
            y = torch.from_numpy(labels[valid].astype(np.int64))
            if len(valid) < self.batch_size:  # evaluation's padding
                pad = self.batch_size - len(valid)
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
                y = torch.cat([y, y.new_full((pad,), PAD_LABEL)])
            yield x.to(self.device), y.to(self.device)


def _read(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    features = np.load(folder / f"{name}.features.npy", mmap_mode="r")
    return features, np.load(folder / f"{name}.labels.npy")


class FeatureStage:
    """A classifier trained on a frozen backbone's cached features; export puts it back on it."""

    def loaders(self, cfg: RunConfig, accelerator, num_classes: int) -> Loaders:
        """Training loaders (one a virtual rank), val and test over the cache."""
        folder = ensure_cache(cfg, accelerator, num_classes)
        lay = layout(cfg, accelerator)
        views = [_read(folder, name) for name, _, _ in _names(cfg) if name.startswith("train_")]
        if cfg.stage2.views and cfg.stage2.skip_plain_view:
            views = views[1:]
        common = {"seed": cfg.seed, "device": accelerator.device}
        train = [
            FeatureLoader(
                views,
                lay.train_batch,
                True,
                rank,
                lay.train_world,
                sampler=cfg.stage2.sampler,
                **common,
            )
            for rank in lay.train_ranks
        ]

        def evaluation(split: str) -> FeatureLoader | None:
            if not split:
                return None
            view = [_read(folder, split)]
            return FeatureLoader(
                view, lay.eval_batch, False, lay.eval_rank, lay.eval_world, **common
            )

        return Loaders(train, evaluation(cfg.data.val_split), evaluation(cfg.data.test_split))

    def model(self, cfg, num_classes, loaders, say) -> nn.Module:
        plain = loaders.train[0].views[0][0]  # the eval-transform view, or the first one read
        statistics = feature_statistics(plain) if cfg.stage2.standardize else None
        return classifier(cfg, num_classes, plain.shape[1], statistics)

    def trained_model(self, cfg, num_classes, weights) -> nn.Module:
        """The backbone with the trained classifier in place of its head (a standardised one
        folded into one linear layer on the raw features)."""
        model = backbone(cfg, num_classes)
        dim = head_module(model).in_features
        trained = classifier(cfg, num_classes, dim, (torch.zeros(dim), torch.ones(dim)))
        if "mean" not in weights:  # trained without standardisation
            trained = trained.fc
        trained.load_state_dict(weights)
        if isinstance(trained, Standardized) and isinstance(trained.fc, nn.Linear):
            trained = trained.folded()
        return replace_head(model, trained)
