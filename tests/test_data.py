import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from shard_fixtures import jpeg_bytes, random_rgb

from gala_scale.data import PAD_LABEL, create_loader
from gala_scale.data.autoaugment import (
    CIFAR10_POLICY,
    RANDAUGMENT_BINS,
    RANDAUGMENT_M,
    RANDAUGMENT_OPS,
    _apply,
    _randaugment_op,
    autoaugment_pil,
    color_jitter_pil,
    randaugment_pil,
    randaugment_translate_pixels,
)
from gala_scale.data.common import cutout_, rebatch
from gala_scale.data.presets import Augment
from gala_scale.shards import tario
from gala_scale.shards.__main__ import main as shards_main
from gala_scale.shards.check import adopt
from gala_scale.shards.manifest import ManifestError

# The torch loader starts DataLoader worker processes: those cases are slow.
KINDS = ["dali", "torch"]
LOADER_CASES = ["dali", pytest.param("torch", marks=pytest.mark.slow)]
SHARD_SIZES = (7, 40, 13, 43)  # deliberately uneven: 103 samples


@pytest.fixture(scope="module")
def unique_set(tmp_path_factory) -> Path:
    """103 samples whose label is their identity (103 classes), in uneven shards."""
    root = tmp_path_factory.mktemp("unique")
    (root / "train").mkdir()
    label = 0
    for number, size in enumerate(SHARD_SIZES):
        samples = []
        for _ in range(size):
            samples.append(
                (
                    f"s{label:05d}",
                    {"jpg": jpeg_bytes(random_rgb(label, 32)), "cls": str(label).encode()},
                )
            )
            label += 1
        tario.write_tar(root / "train" / f"train-{number:06d}.tar", samples)
    adopt(root)
    return root


@pytest.fixture(scope="module")
def large_images(tmp_path_factory) -> Path:
    """JPEGs of 256-400 px for the imagenet preset."""
    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "raw" / cls).mkdir(parents=True)
        for i in range(6):
            w, h = (int(v) for v in rng.integers(256, 401, size=2))
            coarse = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
            img = img.filter(ImageFilter.GaussianBlur(2))  # photo-like smooth content
            img.save(root / "raw" / cls / f"{i}.jpg", quality=90)
    assert (
        shards_main(
            [
                "build",
                "imagefolder",
                "--root",
                str(root / "raw"),
                "--out",
                str(root / "set"),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return root / "set"


def labels_of(loader, epoch: int = 0) -> list[int]:
    return [label for _, y in loader.epoch(epoch) for label in y.tolist()]


def make(root, kind, train, **kw):
    options = {"preset": "cifar", "batch_size": 8, "num_workers": 2, "seed": 3}
    options.update(kw)
    return create_loader(root, "train", kind=kind, train=train, **options)


@pytest.mark.parametrize("kind", LOADER_CASES)
def test_one_epoch_holds_the_manifest_labels(kind, unique_set):
    evaluated = labels_of(make(unique_set, kind, train=False))
    assert len(evaluated) == 13 * 8  # ceil(103 / 8) batches
    assert Counter(x for x in evaluated if x != PAD_LABEL) == Counter(range(103))
    trained = labels_of(make(unique_set, kind, train=True))
    assert len(trained) == (103 // 8) * 8 and len(set(trained)) == len(trained)


@pytest.mark.parametrize("kind", LOADER_CASES)
@pytest.mark.parametrize("train", [False, True])
def test_two_ranks_disjoint_complete_and_equal_length(kind, train, unique_set):
    loaders = [make(unique_set, kind, train, rank=r, world=2) for r in range(2)]
    for epoch in (0, 1):  # DALI's second epoch comes from the same pipelines, reshuffled
        ranks = [labels_of(loader, epoch) for loader in loaders]
        real = [{x for x in labels if x != PAD_LABEL} for labels in ranks]
        assert len(ranks[0]) == len(ranks[1])  # equal batch counts from uneven shards
        assert not real[0] & real[1]
        if train:
            assert len(ranks[0]) == (103 // 2 // 8) * 8
        else:
            assert real[0] | real[1] == set(range(103))
            assert len(ranks[0]) == 7 * 8  # ceil(ceil(103 / 2) / 8) batches


@pytest.mark.parametrize("kind", LOADER_CASES)
def test_epochs_reshuffle_reproducibly(kind, unique_set):
    first = labels_of(make(unique_set, kind, train=True), epoch=0)
    again = labels_of(make(unique_set, kind, train=True), epoch=0)
    second = labels_of(make(unique_set, kind, train=True), epoch=1)
    other_seed = labels_of(make(unique_set, kind, train=True, seed=4), epoch=0)
    assert first == again
    assert first != second and first != other_seed


@pytest.mark.parametrize("kind", LOADER_CASES)
def test_start_step_resumes_inside_an_epoch(kind, unique_set):
    loader = make(unique_set, kind, train=True)
    whole = [y for _, y in loader.epoch(2)]
    resumed = [y for _, y in loader.epoch(2, start_step=5)]
    assert len(resumed) == len(whole) - 5
    assert all(torch.equal(a, b) for a, b in zip(whole[5:], resumed, strict=True))


def _spoil_images(root: Path, labels: set[int]) -> None:
    """Overwrite the start of these samples' JPEGs in place (unique_set: the key is the label)."""
    for path in sorted((root / "train").glob("*.tar")):
        with tarfile.open(path) as tar:
            offsets = [m.offset_data for m in tar if int(m.name[1:6]) in labels and "jpg" in m.name]
        with open(path, "r+b") as f:
            for offset in offsets:
                f.seek(offset)
                f.write(bytes(16))


def test_dali_state_resumes_exactly_without_decoding_the_skipped_batches(unique_set, tmp_path):
    augment = Augment(autoaugment=True, color_jitter=0.4)
    loader = make(unique_set, "dali", True, augment=augment)
    labels_of(loader, 0)  # the pipeline carries on into epoch 1
    stream = loader.epoch(1)
    skipped = [next(stream) for _ in range(5)]
    state = json.loads(json.dumps(loader.state()))  # as a checkpoint stores it
    assert (state["epoch"], state["step"]) == (1, 5)
    rest = list(stream)
    at_end = loader.state()
    assert (at_end["epoch"], at_end["step"]) == (2, 0)
    epoch2 = list(loader.epoch(2))

    spoiled = tmp_path / "spoiled"
    shutil.copytree(unique_set, spoiled)
    _spoil_images(spoiled, {int(v) for _, y in skipped for v in y})
    with pytest.raises(ValueError, match=f"{spoiled}: split 'train': an image does not decode"):
        labels_of(make(spoiled, "dali", True))  # decoding those samples fails
    resumed = make(spoiled, "dali", True, augment=augment)
    resumed.restore(state)
    again = list(resumed.epoch(1, start_step=5))
    assert len(again) == len(rest) == resumed.steps_per_epoch - 5
    for (x, y), (x_again, y_again) in zip(rest, again, strict=True):
        assert torch.equal(y, y_again) and torch.equal(x, x_again)  # augmentations included

    resumed = make(unique_set, "dali", True, augment=augment)
    resumed.restore(at_end)
    for (x, y), (x_again, y_again) in zip(epoch2, resumed.epoch(2), strict=True):
        assert torch.equal(y, y_again) and torch.equal(x, x_again)
    with pytest.raises(ValueError, match=r"seed 3 \(this loader: 4\)"):
        make(unique_set, "dali", True, seed=4).restore(state)


def eval_tensors(root, kind, preset):
    loader = create_loader(
        root,
        "train",
        kind=kind,
        train=False,
        preset=preset,
        batch_size=4,
        num_workers=0 if kind == "torch" else 1,
    )
    images, labels = zip(*loader.epoch(0), strict=True)
    keep = torch.cat(labels) != PAD_LABEL
    return torch.cat(images)[keep], torch.cat(labels)[keep]


@pytest.mark.slow
def test_eval_outputs_of_both_loaders_agree_cifar(unique_set):
    (xd, yd), (xt, yt) = (eval_tensors(unique_set, k, "cifar") for k in KINDS)
    assert torch.equal(yd, yt)
    assert (xd - xt).abs().max().item() <= 1e-5  # same decoder, same arithmetic


@pytest.mark.slow
def test_eval_outputs_of_both_loaders_agree_imagenet(large_images):
    (xd, yd), (xt, yt) = (eval_tensors(large_images, k, "imagenet") for k in KINDS)
    assert xd.shape == xt.shape == (12, 3, 224, 224) and torch.equal(yd, yt)
    # DALI's and PIL's antialiased bilinear resizes differ by rounding; the stated tolerance, in
    # 0-255 pixel units: mean below 1, 99th percentile at most 4, no pixel off by more than 16.
    pixel_diff = (xd - xt).abs() * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    assert pixel_diff.mean().item() < 1.0
    assert pixel_diff.flatten().quantile(0.99).item() <= 4.0
    assert pixel_diff.max().item() <= 16.0


@pytest.mark.parametrize("kind", LOADER_CASES)
def test_train_batches_have_the_model_shape(kind, large_images, unique_set):
    x, _ = next(iter(make(large_images, kind, True, preset="imagenet", batch_size=4).epoch(0)))
    assert x.shape == (4, 3, 224, 224) and x.device.type == "cpu"
    x, _ = next(
        iter(make(unique_set, kind, True, augment=Augment(autoaugment=True), cutout=16).epoch(0))
    )
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()


def test_without_cuda_dali_runs_on_cpu(unique_set):
    loader = make(unique_set, "auto", train=True)
    assert loader.kind == "dali"
    x, y = next(iter(loader.epoch(0)))
    assert x.device.type == "cpu" and y.dtype == torch.long


@pytest.mark.gpu
def test_dali_mixed_decoding_lands_on_the_gpu(unique_set):
    x, y = next(iter(make(unique_set, "dali", True, device="cuda").epoch(0)))
    assert x.device.type == "cuda" and y.device.type == "cuda"


@pytest.mark.gpu
def test_dali_state_restores_mixed_decoding_on_the_gpu(large_images):
    """The GPU pipeline (nvJPEG random-crop decoding, GPU augmentation) restores exactly too."""
    options = {"preset": "imagenet", "batch_size": 4, "device": "cuda"}
    options["augment"] = Augment(color_jitter=0.4, randaugment=True)
    loader = make(large_images, "dali", True, **options)
    stream = loader.epoch(0)
    next(stream)
    state = loader.state()
    rest = list(stream)
    resumed = make(large_images, "dali", True, **options)
    resumed.restore(state)
    again = list(resumed.epoch(0, start_step=1))
    assert len(again) == len(rest) == 2
    for (x, y), (x_again, y_again) in zip(rest, again, strict=True):
        assert torch.equal(y, y_again) and torch.equal(x, x_again)


def test_errors_name_what_is_wrong(unique_set, large_images, tmp_path):
    with pytest.raises(ValueError, match="expects 32x32 images"):
        make(large_images, "torch", True, preset="cifar")
    with pytest.raises(ManifestError, match="num_classes is 103"):
        make(unique_set, "torch", True, num_classes=10)
    with pytest.raises(ManifestError, match="no split 'val'"):
        create_loader(unique_set, "val", preset="cifar", batch_size=8, train=False)
    with pytest.raises(ValueError, match="valid: auto, dali, torch"):
        make(unique_set, "tf", True)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make(unique_set, "torch", True, batch_size=200)
    with pytest.raises(ManifestError, match="no manifest"):
        make(tmp_path, "torch", True)
    broken = tmp_path / "broken"
    shutil.copytree(unique_set, broken)
    (broken / "train" / "train-000002.tar").unlink()
    with pytest.raises(ManifestError, match=r"train-000002\.tar.*but missing"):
        make(broken, "dali", True)


@pytest.mark.parametrize("kind", LOADER_CASES)
def test_corrupt_shard_names_the_file(kind, unique_set, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(unique_set, broken)
    shard = broken / "train" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(Exception, match="train-000001"):
        labels_of(make(broken, kind, train=False))


def test_rebatch_policy():
    chunks = [(torch.ones(n, 1), torch.arange(n)) for n in (3, 5, 2)]  # 10 samples
    train = list(rebatch(iter(chunks), 4, steps=2, pad=False, sample_shape=(1,)))
    assert [len(y) for _, y in train] == [4, 4]
    evaluated = list(rebatch(iter(chunks), 4, steps=4, pad=True, sample_shape=(1,)))
    labels = torch.cat([y for _, y in evaluated])
    assert len(evaluated) == 4 and (labels == PAD_LABEL).sum() == 6
    with pytest.raises(RuntimeError, match="ran dry"):
        list(rebatch(iter(chunks), 4, steps=3, pad=False, sample_shape=(1,)))


def test_cutout_zeroes_a_square():
    images = torch.ones(64, 3, 32, 32)
    cutout_(images, 16, torch.Generator().manual_seed(0))
    zeroed = (images == 0).all(1).flatten(1).sum(1)
    assert zeroed.max() == 256 and zeroed.min() > 0  # whole square inside, or clipped
    assert torch.equal((images == 0).all(1), (images == 0).any(1))  # all channels alike


def test_autoaugment_pil_runs_every_operation():
    img = Image.fromarray(random_rgb(0, 32) // 2 + 50)  # low contrast: auto_contrast acts
    names = {name for sub in CIFAR10_POLICY for name, _, _ in sub}
    assert len(CIFAR10_POLICY) == 25 and len(names) == 13
    for name in sorted(names):
        out = _apply(img, name, 2, -1.0)
        assert out.size == img.size and out.mode == "RGB"
        assert np.any(np.asarray(out) != np.asarray(img)), name
    rng = np.random.default_rng(0)
    changed = sum(
        np.any(np.asarray(autoaugment_pil(img, rng)) != np.asarray(img)) for _ in range(50)
    )
    assert 10 < changed < 50  # sub-policies fire with their probabilities


def _dali_ops(img: np.ndarray, augmentations: dict, cases: list[tuple], bins: int) -> list:
    """Each (operation, magnitude bin, sign) of ``augmentations`` (DALI's) on ``img``."""
    from nvidia.dali import fn, pipeline_def

    def fixed(name: str, sign: float):
        aug = augmentations[name]
        if aug.randomly_negate:
            low, high = aug.mag_range
            aug = aug.augmentation(mag_range=(sign * low, sign * high), randomly_negate=False)
        return aug

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        data = fn.external_source(source=lambda: [img], batch=True, layout="HWC")
        return tuple(
            fixed(name, sign)(data, magnitude_bin=bin_ or 0, num_magnitude_bins=bins)
            for name, bin_, sign in cases
        )

    pipeline = pipe()
    pipeline.build()
    return [np.array(out.as_cpu()[0]) for out in pipeline.run()]


def _dali_autoaugment_ops(img: np.ndarray, cases: list[tuple]) -> list[np.ndarray]:
    """Each (operation, magnitude bin, sign) of DALI's ``reduced_cifar10`` policy on ``img``."""
    from nvidia.dali.auto_aug import auto_augment

    from gala_scale.data.autoaugment import MAGNITUDE_BINS, translate_pixels

    augmentations = dict(auto_augment.get_reduced_cifar10_policy().augmentations)
    for name, aug in augmentations.items():
        if name.startswith("translate"):  # as the DALI loader sets it for this side
            augmentations[name] = aug.augmentation(mag_range=(0, translate_pixels(img.shape[0])))
    return _dali_ops(img, augmentations, cases, MAGNITUDE_BINS)


def _test_image() -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.stack([x * 8, y * 8, (x + y) * 4], -1) * 0.6
    return (smooth + random_rgb(3, 32) * 0.4).clip(0, 255).astype(np.uint8)


def test_autoaugment_pil_equals_dali_operation_by_operation():
    """Every (operation, magnitude) of the CIFAR-10 policy, both signs, against DALI's own.

    Tolerance: mean |difference| <= 2 grey levels, at most 12 % of pixels off by more than 2.
    What is left is rounding, the edge of the grey fill after a warp, and the 1-pixel border
    that PIL's sharpness leaves unfiltered.
    """
    pytest.importorskip("nvidia.dali")
    img = _test_image()
    cases = sorted(
        {(name, bin_, sign) for sub in CIFAR10_POLICY for name, _, bin_ in sub for sign in (1, -1)},
        key=str,
    )
    for (name, bin_, sign), theirs in zip(cases, _dali_autoaugment_ops(img, cases), strict=True):
        ours = np.asarray(_apply(Image.fromarray(img), name, bin_, float(sign))).astype(int)
        diff = np.abs(ours - theirs.astype(int))
        where = f"{name} magnitude {bin_} sign {sign:+d}"
        assert diff.mean() <= 2.0 and (diff > 2).mean() <= 0.12, (where, diff.mean())


def test_randaugment_pil_equals_dali_operation_by_operation():
    """Each of the 14 operations at the magnitude the loaders use (9 of 30), both signs where
    DALI negates, against DALI's ``rand_augment`` suite with the DALI loader's translate bound.
    Tolerance as for AutoAugment."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali.auto_aug import rand_augment

    img = _test_image()
    suite = rand_augment.get_rand_augment_suite(
        max_translate_abs=randaugment_translate_pixels(img.shape[0])
    )
    augmentations = {aug.name: aug for aug in suite}
    assert sorted(augmentations) == sorted(RANDAUGMENT_OPS)
    cases = [
        (name, RANDAUGMENT_M, sign)
        for name in RANDAUGMENT_OPS
        for sign in ((1, -1) if augmentations[name].randomly_negate else (1,))
    ]
    level = RANDAUGMENT_M / (RANDAUGMENT_BINS - 1)
    theirs_all = _dali_ops(img, augmentations, cases, RANDAUGMENT_BINS)
    for (name, _, sign), theirs in zip(cases, theirs_all, strict=True):
        ours = np.asarray(_randaugment_op(Image.fromarray(img), name, level, float(sign)))
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        where = f"{name} sign {sign:+d}"
        assert diff.mean() <= 2.0 and (diff > 2).mean() <= 0.12, (where, diff.mean())


@pytest.mark.parametrize("kind", LOADER_CASES)
def test_color_jitter_and_randaugment_in_both_loaders(kind, large_images):
    options = Augment(color_jitter=0.4, randaugment=True)
    loader = make(large_images, kind, True, preset="imagenet", batch_size=4, augment=options)
    x, _ = next(iter(loader.epoch(0)))
    assert x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="CIFAR policy"):
        make(large_images, kind, True, preset="imagenet", augment=Augment(autoaugment=True))


def test_randaugment_and_jitter_operations():
    img = Image.fromarray(random_rgb(3, 32) // 2 + 50)
    assert len(RANDAUGMENT_OPS) == 14
    for name in RANDAUGMENT_OPS:
        out = _randaugment_op(img, name, 0.6, 1.0)
        assert out.size == img.size and out.mode == "RGB"
        assert (name == "identity") == np.array_equal(np.asarray(out), np.asarray(img)), name
    rng = np.random.default_rng(0)
    assert not np.array_equal(np.asarray(randaugment_pil(img, rng)), np.asarray(img))
    jittered = np.asarray(color_jitter_pil(img, 0.4, rng), dtype=float)
    assert np.abs(jittered - np.asarray(img)).mean() > 1
    with pytest.raises(ValueError, match="color_jitter"):
        Augment(color_jitter=1.5)
