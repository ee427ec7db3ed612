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
pretrained backbone), with a ``meta.json`` that names the weights (their sha256), the preset and
the views; a later stage-2 run on the same backbone reads them and computes nothing, so a sweep
over losses and samplers costs seconds. Then the trainer runs as in stage 1 on a linear
classifier over the features, with any loss (the GALA ledger, PN, metrics, plots, checkpoints and
resumes alike) and a sampler: ``instance`` (every sample once an epoch), ``class_balanced`` (each
class drawn equally often) or ``sqrt`` (a class drawn in proportion to the square root of its
count). Its ``final/`` and ``best/`` hold the classifier; export puts it back on the backbone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gala_scale import dist
from gala_scale.config import ConfigError, RunConfig
from gala_scale.data import PAD_LABEL, create_loader
from gala_scale.models import create_model, model_options, run_preset
from gala_scale.models.pretrained import head_module, load_pretrained
from gala_scale.run import Loaders
from gala_scale.shards.tario import sha256
from gala_scale.stages import augmentation, layout, preset

SAMPLERS = ("instance", "class_balanced", "sqrt")
META = "meta.json"


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


def classifier(cfg: RunConfig, num_classes: int, feature_dim: int) -> nn.Linear:
    """The stage-2 classifier: a fresh linear layer (seeded), or the backbone's own head with
    ``stage2.reset_head: false``."""
    torch.manual_seed(cfg.seed)
    fresh = nn.Linear(feature_dim, num_classes)
    if not cfg.stage2.reset_head:
        head = head_module(backbone(cfg, num_classes))
        if not isinstance(head, nn.Linear) or head.in_features != feature_dim:
            raise ConfigError("stage2.reset_head: false needs the backbone's head to be Linear")
        fresh.load_state_dict(head.state_dict())
    return fresh


def cache_dir(cfg: RunConfig) -> Path:
    s = cfg.stage2
    if s.cache:
        return Path(s.cache)
    return Path(s.from_run or cfg.run_dir) / "features"


def _meta(cfg: RunConfig, weights: Path) -> dict:
    d = cfg.data
    return {
        "model": cfg.model.name,
        "weights": str(weights),
        "weights_sha256": sha256(weights),
        "preset": run_preset(d, cfg.model.name).to_dict(),
        "augment": [d.autoaugment, d.color_jitter, d.randaugment, d.cutout],
        "views": cfg.stage2.views,
        # Only augmented views depend on the seed: the eval view is the same for every seed.
        "seed": cfg.seed if cfg.stage2.views else None,
        "bn_eps": cfg.model.bn_eps,
        "shards": str(Path(d.shards).resolve()),
        "splits": [d.train_split, d.val_split, d.test_split],
    }


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


def ensure_cache(cfg: RunConfig, accelerator, num_classes: int) -> Path:
    """Compute the feature files unless ``cache_dir`` holds them for this backbone already."""
    folder, weights = cache_dir(cfg), backbone_weights(cfg)
    meta = json.loads(json.dumps(_meta(cfg, weights)))  # as the file holds it (lists)
    fresh = (folder / META).is_file() and json.loads((folder / META).read_text()) == meta
    if dist.broadcast_object(fresh):
        return folder
    model = backbone(cfg, num_classes).to(accelerator.device)
    d, lay = cfg.data, layout(cfg, accelerator)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
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
        accelerator.print(f"stage2 features: {name} ({split}) computed")
        if out is not None:
            np.save(tmp / f"{name}.features.npy", out[0])
            np.save(tmp / f"{name}.labels.npy", out[1])
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            _remove(old)
        else:
            tmp.rename(folder)
    accelerator.wait_for_everyone()
    return folder


def _remove(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


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
        return classifier(cfg, num_classes, loaders.train[0].views[0][0].shape[1])

    def trained_model(self, cfg, num_classes, weights) -> nn.Module:
        """The backbone with the trained classifier in place of its head."""
        model = backbone(cfg, num_classes)
        head_module(model).load_state_dict(weights)
        return model
