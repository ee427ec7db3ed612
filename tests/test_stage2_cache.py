"""Stage 2's feature cache: the key holds everything that shapes the features (every config
field unless excluded with a reason), and each key's features are a version of their own,
published whole, so runs that share the cache never see one another's.

The extraction tests run ``ensure_cache`` in this process (the torch loader without workers, the
tiny model from a weights file), so no training process is needed.
"""

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gala_scale import config, features
from gala_scale.config import load_config
from gala_scale.features import ensure_cache
from gala_scale.models.tiny import TinyNet


@pytest.fixture
def inputs(tmp_path):
    """A stand-in shard set (only its manifest is read) and weights file."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"num_classes": 6}')
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"weights")
    return shards, weights


BASE = [
    "model.name=tiny",
    "data.preset=imagenet",  # a preset that takes input_size and crop_pct
    "stage2.enabled=true",
    "stage2.views=1",
]


def key_of(inputs, *overrides: str, processes: int = 1, device: str = "cpu") -> dict:
    shards, weights = inputs
    cfg = load_config(overrides=[f"data.shards={shards}", *BASE, *overrides])
    return features.cache_key(cfg, weights, processes, device)


# Each changes what is extracted: a different loader, decode, preset, augmentation, order,
# batch (augmented views drop a partial last batch), split or backbone.
MISSES = [
    "data.loader=torch",
    "data.preset=cifar",
    "data.input_size=64",
    "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.2,0.2,0.2]",
    "data.crop_pct=0.9",
    "data.num_workers=3",
    "data.eval_batch_size=128",
    ("data.autoaugment=true", "data.preset=cifar"),  # (the change, where it applies)
    "data.cutout=8",
    "data.color_jitter=0.4",
    "data.randaugment=true",
    "data.train_split=other",
    "data.val_split=",
    "data.test_split=",
    "model.name=tiny_bn",
    "model.bn_eps=0.001",
    "model.pretrained_layout=torchvision",
    "stage2.views=2",
    "seed=1",  # with views > 0
    "train.cudnn_benchmark=false",  # cuDNN's algorithms (on a GPU) may differ in the last bits
]

# Each leaves the features as they are: training on them, or where things lie.
HITS = [
    "loss.name=balanced_softmax",
    "optim.name=adamw",
    "optim.lr=0.1",
    "train.epochs=7",
    "train.precision=bf16",
    "train.emulate_world=2",
    "pn.tau=0.5",
    "pn.fit_tau=true",
    "data.batch_size=128",
    "data.mixup=0.2",
    "data.mix_prob=0.5",
    "data.loader=dali",  # what auto means
    "stage2.sampler=sqrt",
    "stage2.reset_head=false",
    "stage2.skip_plain_view=true",
    "stage2.from_weights=best",
    "stage2.cache=/elsewhere",
    "run_dir=/elsewhere",
    "model.finetune=linear",
]


@pytest.mark.parametrize("override", MISSES)
def test_a_field_that_shapes_the_features_misses_the_cache(inputs, override):
    override, *context = override if isinstance(override, tuple) else (override,)
    assert key_of(inputs, *context, override) != key_of(inputs, *context)


@pytest.mark.parametrize("override", HITS)
def test_a_field_that_does_not_shape_the_features_hits_the_cache(inputs, override):
    assert key_of(inputs, override) == key_of(inputs)


def test_the_seed_matters_only_with_augmented_views(inputs):
    assert key_of(inputs, "stage2.views=0", "seed=1") == key_of(inputs, "stage2.views=0")
    assert key_of(inputs, "stage2.views=1", "seed=1") != key_of(inputs, "stage2.views=1")


def test_auto_preset_is_keyed_as_the_preset_it_resolves_to(inputs):
    assert key_of(inputs, "data.preset=auto") == key_of(inputs, "data.preset=cifar")


def test_weights_shards_processes_and_device_are_keyed_by_what_they_are(inputs, tmp_path):
    shards, weights = inputs
    base = key_of(inputs)
    assert key_of(inputs, processes=2) != base  # each rank's share, batch and augmentation
    assert key_of(inputs, device="cuda") != base  # DALI decodes on the GPU there
    # Moved, same bytes: a hit.
    moved_shards, moved_weights = tmp_path / "moved", tmp_path / "moved.safetensors"
    shutil.copytree(shards, moved_shards)
    shutil.copyfile(weights, moved_weights)
    moved = load_config(overrides=[f"data.shards={moved_shards}", *BASE])
    assert features.cache_key(moved, moved_weights, 1, "cpu") == base
    # Other bytes at the same paths: a miss.
    weights.write_bytes(b"other weights")
    assert key_of(inputs) != base
    weights.write_bytes(b"weights")
    (shards / "manifest.json").write_text('{"num_classes": 6, "rebuilt": true}')
    assert key_of(inputs) != base


def leaves(obj, prefix: str = "") -> dict:
    """Every field of a config, dotted."""
    found = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found |= leaves(value, f"{prefix}{f.name}.")
        else:
            found[f"{prefix}{f.name}"] = value
    return found


def excluded(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in features.KEY_EXCLUDED)


def other_values(key: str, value) -> list:
    if key in config.CHOICES:
        return [c for c in config.CHOICES[key] if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int | float):
        return [value + 1 if isinstance(value, int) else value + 0.25]
    if isinstance(value, list):
        return [[v / 2 for v in value] if value else [0.5, 0.5, 0.5]]
    return [f"{value}_other"]


def test_every_config_field_is_in_the_key_unless_excluded_with_a_reason(inputs, tmp_path):
    """Flip each field of the whole config: an excluded one never changes the key, any other
    (as written, or as it resolves) does; for a field with choices at least one of them does,
    since auto may name the default."""
    shards, weights = inputs
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    base = load_config(overrides=[f"data.shards={shards}", *BASE])
    want = features.cache_key(base, weights, 1, "cpu")
    for key, value in leaves(base).items():
        changed = []
        for other in [str(moved)] if key == "data.shards" else other_values(key, value):
            cfg = load_config(overrides=[f"data.shards={shards}", *BASE])
            section, _, name = key.rpartition(".")
            setattr(config.get(cfg, section) if section else cfg, name, other)
            changed.append(features.cache_key(cfg, weights, 1, "cpu") != want)
        if excluded(key):
            assert not any(changed), f"{key} is excluded from the key but changes it"
        else:
            assert any(changed), f"{key} is neither in the key nor excluded with a reason"


def test_the_exclusions_name_real_fields_with_reasons():
    fields = leaves(config.RunConfig())
    sections = {key.rpartition(".")[0] for key in fields}
    for name, reason in (features.KEY_EXCLUDED | features.KEY_RESOLVED).items():
        assert name in fields or name in sections, f"{name}: no such config field or section"
        assert len(reason) > 20, f"{name}: say why it does not shape the features"


def test_a_field_added_to_the_config_later_is_in_the_key_by_default(inputs):
    """No list to update: a new data field (say a blur) is keyed as soon as it exists."""
    shards, weights = inputs
    Data = dataclasses.make_dataclass("Data", [("blur", float, 0.0)], bases=(config.DataConfig,))
    keys = []
    for blur in (0.0, 0.5):
        cfg = load_config(overrides=[f"data.shards={shards}", *BASE])
        cfg.data = Data(**dataclasses.asdict(cfg.data), blur=blur)
        keys.append(features.cache_key(cfg, weights, 1, "cpu"))
    assert keys[0] != keys[1]


# Extraction for real, in this process.


class OneProcess:
    """The part of an Accelerator that ensure_cache uses, for one CPU process."""

    device = torch.device("cpu")
    num_processes, process_index, is_main_process = 1, 0, True

    def print(self, *args) -> None:
        pass

    def wait_for_everyone(self) -> None:
        pass


@pytest.fixture
def backbone_run(synthetic_shards, tmp_path):
    weights = tmp_path / "backbone.safetensors"
    torch.manual_seed(0)
    save_file(TinyNet(num_classes=6).state_dict(), weights)
    cache = tmp_path / "cache"

    def cfg(*overrides: str):
        return load_config(
            overrides=[
                f"data.shards={synthetic_shards}",
                "data.loader=torch",
                "data.num_workers=0",
                "data.preset=cifar",
                "data.eval_batch_size=40",
                "model.name=tiny",
                f"model.pretrained={weights}",
                "stage2.enabled=true",
                "stage2.views=1",
                f"stage2.cache={cache}",
                f"run_dir={tmp_path / 'run'}",
                *overrides,
            ]
        )

    return cfg, cache


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_features_are_not_reused_when_the_extraction_batch_changes(backbone_run):
    """The augmented view is read in batches of data.eval_batch_size, the last partial one
    dropped: 256 training images give 240 rows in batches of 40 and 256 in batches of 64."""
    cfg, _ = backbone_run
    first = ensure_cache(cfg(), OneProcess(), 6)
    assert len(np.load(first / "train_view1.labels.npy")) == 240
    second = ensure_cache(cfg("data.eval_batch_size=64"), OneProcess(), 6)
    assert len(np.load(second / "train_view1.labels.npy")) == 256  # not the stale 240


def test_each_key_is_a_version_of_its_own_that_others_never_touch(backbone_run):
    """A run reading its features while another run (other views) publishes its own keeps
    its files: no rename away, no window without a cache, no other features under its path."""
    cfg, cache = backbone_run
    mine = ensure_cache(cfg(), OneProcess(), 6)
    held = files(mine)
    mapped = np.load(mine / "train_view0.features.npy", mmap_mode="r")
    theirs = ensure_cache(cfg("stage2.views=2"), OneProcess(), 6)
    assert theirs != mine and theirs.parent == mine.parent == cache
    assert files(mine) == held and (theirs / "train_view2.labels.npy").is_file()
    assert np.array_equal(mapped, np.load(mine / "train_view0.features.npy"))
    # Asked again, each finds its own, computes nothing and changes nothing.
    assert ensure_cache(cfg(), OneProcess(), 6) == mine and files(mine) == held
    meta = json.loads((mine / "meta.json").read_text())
    assert meta["key"]["config"]["stage2.views"] == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left


def test_two_runs_computing_the_same_key_at_once_share_one_whole_version(backbone_run, monkeypatch):
    """Both check the cache before either has published (a barrier holds each at its first
    batch); both compute; the first to publish wins, the other keeps what is there."""
    cfg, cache = backbone_run
    barrier, extract = threading.Barrier(2, timeout=120), features._extract
    seen: set[int] = set()

    def extract_after_both_checked(model, batches):
        if threading.get_ident() not in seen:
            seen.add(threading.get_ident())
            barrier.wait()
        return extract(model, batches)

    monkeypatch.setattr(features, "_extract", extract_after_both_checked)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(ensure_cache(cfg(), OneProcess(), 6))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    folder = results[0]
    assert len(np.load(folder / "train_view1.labels.npy")) == 240
    assert json.loads((folder / "meta.json").read_text())["key"] == json.loads(
        json.dumps(features.cache_key(cfg(), Path(cfg().model.pretrained), 1, "cpu"))
    )
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary left


def test_a_build_killed_mid_split_goes_on_from_its_last_chunk(backbone_run, monkeypatch):
    """The first build stops after two chunks of the first split (an exception standing in
    for a kill: nothing is cleaned up); the second computes only the batches after them, and
    the published version equals one built in one go."""
    cfg, cache = backbone_run
    monkeypatch.setattr(features, "CHUNK_BATCHES", 2)
    calls, extract = [], features._extract

    def counting(model, batches):
        batches = list(batches)
        calls.append(len(batches))
        if len(calls) == 3 and not resumed:
            raise KeyboardInterrupt  # mid-way through the first split
        return extract(model, batches)

    monkeypatch.setattr(features, "_extract", counting)
    resumed = False
    with pytest.raises(KeyboardInterrupt):
        ensure_cache(cfg(), OneProcess(), 6)
    (partial,) = cache.glob(".*.partial-c2")
    assert len(list(partial.glob("train_view0.chunk*.npz"))) == 2
    assert calls[:2] == [2, 2]
    resumed, calls[:] = True, []
    folder = ensure_cache(cfg(), OneProcess(), 6)
    assert not partial.exists() and [p.name for p in cache.iterdir()] == [folder.name]
    resumed_batches, calls[:] = sum(calls), []
    fresh = ensure_cache(cfg(f"stage2.cache={cache.parent / 'again'}"), OneProcess(), 6)
    assert resumed_batches == sum(calls) - 4  # the two chunks kept were not computed again
    for name in ("train_view0", "train_view1", "val", "test"):
        for kind in ("features", "labels"):
            np.testing.assert_array_equal(
                np.load(folder / f"{name}.{kind}.npy"), np.load(fresh / f"{name}.{kind}.npy")
            )
