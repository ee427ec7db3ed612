"""Two-stage (decoupled) training: re-train the classifier on cached, frozen features.

``stage2.enabled: true`` turns a run into stage 2 of a finished run (``stage2.from_run``: its
``final/`` or ``best/`` weights) or of a pretrained backbone (``model.name`` with
``model.pretrained``). The backbone's features are computed once and cached
(gala_scale.features), so a sweep over losses and samplers costs seconds.

Then the trainer runs as in stage 1 on a classifier over the features (linear, or cosine with
``model.head: cosine``; on standardised features with ``stage2.standardize``), with any loss
(the GALA ledger, PN, metrics, plots, checkpoints and resumes alike) and a sampler:
``instance`` (every sample once an epoch), ``class_balanced`` (each class drawn equally often) or
``sqrt`` (a class drawn in proportion to the square root of its count). Its ``final/`` and
``best/`` hold the classifier; export puts it back on the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from gala_scale.config import ConfigError, RunConfig
from gala_scale.data import PAD_LABEL
from gala_scale.features import backbone, cache_names, ensure_cache, read_split
from gala_scale.models.heads import CosineLinear, load_head, replace_head
from gala_scale.models.pretrained import head_module
from gala_scale.recipe import cosine_scale
from gala_scale.run import Loaders
from gala_scale.stages import layout

SAMPLERS = ("instance", "class_balanced", "sqrt")


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
        out = nn.Linear(self.fc.in_features, self.fc.out_features)
        load_head(out, self.state_dict())
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
            # torch widens float16 about 8x faster than numpy's astype (the epoch's main cost).
            x = torch.from_numpy(np.ascontiguousarray(features[valid])).float()
            y = torch.from_numpy(labels[valid].astype(np.int64))
            if len(valid) < self.batch_size:  # evaluation's padding
                pad = self.batch_size - len(valid)
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
                y = torch.cat([y, y.new_full((pad,), PAD_LABEL)])
            yield x.to(self.device), y.to(self.device)


class FeatureStage:
    """A classifier trained on a frozen backbone's cached features; export puts it back on it."""

    def loaders(self, cfg: RunConfig, accelerator, num_classes: int) -> Loaders:
        """Training loaders (one a virtual rank), val and test over the cache."""
        folder = ensure_cache(cfg, accelerator, num_classes)
        lay = layout(cfg, accelerator)
        views = [
            read_split(folder, name) for name, _, _ in cache_names(cfg) if name.startswith("train_")
        ]
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
            view = [read_split(folder, split)]
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
        if cfg.model.head == "cosine":
            trained = CosineLinear(dim, num_classes, *cosine_scale(cfg))
        else:
            trained = nn.Linear(dim, num_classes)
        if "mean" in weights:  # trained on standardised features
            trained = Standardized(trained, torch.zeros(dim), torch.ones(dim))
        trained.load_state_dict(weights)
        if isinstance(trained, Standardized) and isinstance(trained.fc, nn.Linear):
            trained = trained.folded()
        return replace_head(model, trained)
