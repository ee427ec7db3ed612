"""The stage-2 feature cache: a frozen backbone's features of every split, computed once.

The backbone's features (the input of its classifier) are computed through the run's own
loaders:

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
key reads them and computes nothing. A version is built in ``.<key hash>.partial-c<n>/`` (a split's
rows in chunks of :data:`CHUNK_BATCHES` batches, each written whole), so a build that was
stopped or killed goes on from its last chunk; it is renamed in whole when complete
(gala_scale.publish), and never replaced or removed by a run, so runs sharing the cache each read
their own. A second build of the same key while one runs builds privately, without resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gala_scale import dist, publish
from gala_scale.config import ConfigError, RunConfig
from gala_scale.data import PAD_LABEL, create_loader
from gala_scale.logs import get_logger
from gala_scale.models import create_model, model_options
from gala_scale.models.pretrained import head_module, load_pretrained
from gala_scale.shards.tario import sha256
from gala_scale.stages import augmentation, layout, preset

log = get_logger(__name__)
CHUNK_BATCHES = 16  # a resumed build loses at most this many batches of work
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
    "model.freeze_bn": "the mode of stage 1's BatchNorms; extraction runs every one in eval mode",
    "model.head": "the classifier stage 2 trains on the features (they are the head's input)",
    "model.head_from": "the head a fine-tuning run starts from; stage 2 trains its own",
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


def cache_names(cfg: RunConfig) -> list[tuple[str, str, int | None]]:
    """(cache name, split, view) of every file: view None is the eval transform."""
    d = cfg.data
    names = [("train_view0", d.train_split, None)]
    names += [(f"train_view{v}", d.train_split, v) for v in range(1, cfg.stage2.views + 1)]
    names += [(split, split, None) for split in dict.fromkeys((d.val_split, d.test_split)) if split]
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
    if dist.rank() != 0 or not feats:
        return None
    return np.concatenate(feats), np.concatenate(labels)


def _save(path: Path, **arrays: np.ndarray) -> None:
    """``arrays`` into ``path`` (.npz), written under a temporary name and renamed: whole or not
    there."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _join(folder: Path, name: str, chunks: list[Path]) -> None:
    """The chunks of a split, in order, into its two cache files (features first: the labels
    file marks a split complete); the chunks are removed."""
    rows = [np.load(c)["labels"].shape[0] for c in chunks]
    dim = np.load(chunks[0])["features"].shape[1]
    tmp = folder / f"{name}.features.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(sum(rows), dim))
    labels, at = [], 0
    for chunk, n in zip(chunks, rows, strict=True):
        with np.load(chunk) as part:
            out[at : at + n] = part["features"]
            labels.append(part["labels"])
        at += n
    out.flush()
    del out
    os.replace(tmp, folder / f"{name}.features.npy")
    with open(folder / f"{name}.labels.tmp.npy", "wb") as f:
        np.save(f, np.concatenate(labels))
    os.replace(folder / f"{name}.labels.tmp.npy", folder / f"{name}.labels.npy")
    for chunk in chunks:
        chunk.unlink()


def _write_split(model: nn.Module, loader, epoch: int, folder: Path | None, name: str) -> None:
    """One cache file pair, from the chunk after the last one ``folder`` holds (a resumed build),
    with a progress bar on the main process; ``folder`` None on the other ranks."""
    main = folder is not None
    done = sorted(folder.glob(f"{name}.chunk*.npz")) if main else []
    start = dist.broadcast_object(len(done) if main else None)
    steps = loader.steps_per_epoch
    batches = loader.epoch(epoch, start * CHUNK_BATCHES)
    with tqdm(
        total=steps,
        initial=min(steps, start * CHUNK_BATCHES),
        desc=f"features {name}",
        unit="batch",
        disable=not main,
        file=sys.stderr,
    ) as bar:
        for index in range(start, -(-steps // CHUNK_BATCHES)):
            out = _extract(model, itertools.islice(batches, CHUNK_BATCHES))
            if out is not None:
                _save(folder / f"{name}.chunk{index:05d}.npz", features=out[0], labels=out[1])
            bar.update(min(CHUNK_BATCHES, steps - index * CHUNK_BATCHES))
    if main:
        _join(folder, name, sorted(folder.glob(f"{name}.chunk*.npz")))


def _write_features(cfg: RunConfig, accelerator, model: nn.Module, num_classes: int, folder):
    """Every cache file into ``folder`` (on the main process, None elsewhere: the other ranks
    send their rows); a split ``folder`` already holds whole is kept."""
    d, lay = cfg.data, layout(cfg, accelerator)
    common = {"preset": preset(cfg), "kind": d.loader, "seed": cfg.seed}
    common |= {"rank": lay.eval_rank, "world": lay.eval_world, "device": accelerator.device}
    common |= {"num_workers": d.num_workers, "num_classes": num_classes}
    for name, split, view in cache_names(cfg):
        whole = folder is not None and (folder / f"{name}.labels.npy").exists()
        if dist.broadcast_object(whole if folder is not None else None):
            log.info("stage2 features: %s (%s) kept from an interrupted build", name, split)
            continue
        train = view is not None
        loader = create_loader(
            d.shards,
            split,
            batch_size=max(1, lay.eval_batch),
            train=train,
            **(augmentation(cfg) if train else {}),
            **common,
        )
        _write_split(model, loader, view or 0, folder, name)
        log.info("stage2 features: %s (%s) computed", name, split)


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[Path]:
    """Where this process builds ``folder``: ``.<name>.partial/`` beside it (kept by a stopped
    build, continued by the next), published whole at the end; or, while another process holds
    that one's lock, a private temporary folder (gala_scale.publish.staged)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.with_name(f".{folder.name}.lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The winner unlinks the lock file when it publishes: a lock taken on that old file
            # (opened before the unlink) is no lock at all.
            held = os.fstat(lock.fileno()).st_ino == os.stat(lock_path).st_ino
        except OSError:  # held by another builder; or a file system without flock (ENOLCK)
            held = False
        if not held:
            log.info("stage2 features: another process builds %s (or no lock); a copy", folder)
            with publish.staged(folder, replace=False) as tmp:
                yield tmp
            return
        # The chunk size in the name: a resume counts chunks, so it must be the same size.
        partial = folder.with_name(f".{folder.name}.partial-c{CHUNK_BATCHES}")
        partial.mkdir(exist_ok=True)
        yield partial
        publish.publish(partial, folder, replace=False)
        shutil.rmtree(partial, ignore_errors=True)  # there only if another copy came first
        lock_path.unlink(missing_ok=True)


def ensure_cache(cfg: RunConfig, accelerator, num_classes: int) -> Path:
    """The folder of this run's features: the cache's version with this run's key, computed and
    published first unless it is there already (the module docstring: resume, concurrent builds).

    A version is never replaced: where another run published the same key meanwhile, that one
    is kept (the same features) and this one dropped. So a run reading its version never sees
    it change or go."""
    weights = backbone_weights(cfg)
    key = cache_key(cfg, weights, accelerator.num_processes, accelerator.device.type)
    folder = version_folder(cfg, key)
    held = _holds(folder, key) if dist.rank() == 0 else None
    if dist.broadcast_object(held):  # rank 0's view (a run may publish it meanwhile)
        return folder
    model = backbone(cfg, num_classes).to(accelerator.device)
    main = accelerator.is_main_process
    with _building(folder) if main else contextlib.nullcontext() as build:
        _write_features(cfg, accelerator, model, num_classes, build)
        if main:
            source = {"weights": str(weights), "shards": str(Path(cfg.data.shards).resolve())}
            (build / META).write_text(json.dumps({"key": key, "source": source}, indent=1))
    accelerator.wait_for_everyone()
    return folder


def read_split(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    features = np.load(folder / f"{name}.features.npy", mmap_mode="r")
    return features, np.load(folder / f"{name}.labels.npy")
