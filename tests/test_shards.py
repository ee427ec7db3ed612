import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_fixtures import (
    jpeg_bytes,
    random_rgb,
    write_cifar10_pickles,
    write_image_tree,
)

from gala_scale.shards import tario
from gala_scale.shards.__main__ import main
from gala_scale.shards.like import DATA
from gala_scale.shards.manifest import load_manifest
from gala_scale.shards.sources import long_tailed_counts

CIFAR10 = DATA / "cifar10"  # the real data beside the project, or wherever GALA_DATA points


def build(*args: str) -> int:
    return main(["build", *map(str, args), "--workers", "2"])


def keys_by_split(out: Path) -> dict[str, set[str]]:
    manifest = load_manifest(out)
    return {
        split: {key for s in info["shards"] for key, _ in tario.iter_tar(out / s["file"])}
        for split, info in manifest["splits"].items()
    }


@pytest.mark.parametrize(
    ("n_max", "classes", "factor", "total"),
    [(5000, 10, 100, 12406), (5000, 10, 200, 11203), (500, 100, 100, 10847)],
)
def test_long_tailed_counts_follow_the_formula(n_max, classes, factor, total):
    counts = long_tailed_counts(n_max, classes, factor)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == int(n_max / factor)
    assert counts == sorted(counts, reverse=True)


def build_cifar_lt(tmp_path: Path, factor: float, val_from: str | None) -> dict:
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10_pickles(root, per_class=400, test_per_class=5)
    out = tmp_path / "lt"
    argv = ["cifar", "--root", root, "--imbalance-factor", factor, "--val-per-class", 8]
    argv += ["--out", out, "--shard-size", 300] + (["--val-from", val_from] if val_from else [])
    assert build(*argv) == 0
    keys = keys_by_split(out)
    assert not keys["val"] & keys["train"]
    assert all(k.startswith("train_") for k in keys["train"] | keys["val"])
    assert all(k.startswith("test_") for k in keys["test"])
    manifest = load_manifest(out)
    assert manifest["splits"]["test"]["class_counts"] == [5] * 10
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("factor", [200, 100, 10])
def test_cifar_val_is_reserved_before_subsampling_by_default(tmp_path, factor):
    manifest = build_cifar_lt(tmp_path, factor, None)
    assert manifest["val_from"] == "reserved"
    # Every class, the head included, has its 8 val images; the head trains on 400 - 8.
    assert manifest["splits"]["val"]["class_counts"] == [8] * 10
    assert manifest["splits"]["train"]["class_counts"] == long_tailed_counts(392, 10, factor)
    assert manifest["warnings"] == []


@pytest.mark.slow
@pytest.mark.parametrize("factor", [200, 100, 50, 10])
def test_cifar_leftover_val_keeps_the_literature_counts(tmp_path, factor):
    manifest = build_cifar_lt(tmp_path, factor, "leftover")
    assert manifest["val_from"] == "leftover"
    assert manifest["splits"]["train"]["class_counts"] == long_tailed_counts(400, 10, factor)
    # Class 0 keeps all its 400 images, so it has none left for val (and says so).
    assert manifest["splits"]["val"]["class_counts"] == [0] + [8] * 9
    assert "fewer images than asked for classes 0 (0)" in manifest["warnings"][0]


@pytest.mark.slow
def test_subset_is_seeded_and_independent_of_val_size(tmp_path):
    root = tmp_path / "raw"
    write_cifar10_pickles(root, per_class=60, test_per_class=1)
    outs = []
    for name, seed, val in (("a", 1, 5), ("b", 1, 2), ("c", 2, 5)):
        build(
            "cifar",
            "--root",
            root,
            "--imbalance-factor",
            10,
            "--val-from",
            "leftover",
            "--val-per-class",
            val,
            "--seed",
            seed,
            "--out",
            tmp_path / name,
        )
        outs.append(keys_by_split(tmp_path / name)["train"])
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert load_manifest(tmp_path / "a")["seed"] == 1


@pytest.mark.slow
def test_imagefolder_formats_are_normalised_and_bad_images_excluded(tmp_path):
    root = tmp_path / "folder"
    write_image_tree(root, {"a": 3, "b": 3})
    rgb = random_rgb(7)
    Image.fromarray(rgb).convert("L").save(root / "a" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "a" / "alpha.png")
    Image.fromarray(rgb).convert("P").save(root / "b" / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "b" / "cmyk.jpg")
    (root / "b" / "cut.jpg").write_bytes(jpeg_bytes(random_rgb(8, 64))[:300])
    (root / "b" / "noise.png").write_bytes(b"not an image")
    original = (root / "a" / "0000.jpg").read_bytes()
    out = tmp_path / "out"
    assert build("imagefolder", "--root", root, "--out", out) == 0
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["class_counts"] == [5, 5]
    reasons = {Path(e["source"]).name: e["reason"] for e in manifest["excluded"]}
    assert set(reasons) == {"cut.jpg", "noise.png"}
    assert "truncated" in reasons["cut.jpg"] or "OSError" in reasons["cut.jpg"]
    stored = [
        files["jpg"]
        for s in manifest["splits"]["train"]["shards"]
        for _, files in tario.iter_tar(out / s["file"])
    ]
    assert original in stored  # an RGB JPEG is kept byte for byte
    for data in stored:
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.mode in ("RGB", "L")
            assert img.mode == "RGB" or data in {
                (root / "a" / f"{i:04d}.jpg").read_bytes() for i in range(3)
            }


@pytest.mark.slow
def test_max_side_shrinks_large_images(tmp_path):
    root = tmp_path / "big"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir(parents=True)
    for cls in "xy":
        (root / cls / "0.jpg").write_bytes(jpeg_bytes(random_rgb(1, 120)))
    build("imagefolder", "--root", root, "--out", tmp_path / "o", "--max-side", 50)
    manifest = load_manifest(tmp_path / "o")
    for _, files in tario.iter_tar(
        tmp_path / "o" / manifest["splits"]["train"]["shards"][0]["file"]
    ):
        assert max(Image.open(io.BytesIO(files["jpg"])).size) == 50


def make_list_dataset(tmp_path: Path, missing: int = 0) -> tuple[Path, Path, Path]:
    root = tmp_path / "images"
    paths = write_image_tree(root, {"n01": 4, "n02": 2, "n03": 1})
    lines = [f"{p.relative_to(root)} {int(p.parent.name[1:]) - 1}" for p in paths]
    lines += [f"n03/gone{i}.jpg 2" for i in range(missing)]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(lines) + "\n")
    test = tmp_path / "test.txt"
    test.write_text("\n".join(lines[:3]) + "\n")
    return root, train, test


@pytest.mark.slow
def test_list_files(tmp_path):
    root, train, test = make_list_dataset(tmp_path)
    out = tmp_path / "out"
    assert (
        build(
            "list",
            "--root",
            root,
            "--list",
            f"train={train}",
            "--list",
            f"test={test}",
            "--out",
            out,
        )
        == 0
    )
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["class_counts"] == [4, 2, 1]
    assert manifest["splits"]["test"]["num_samples"] == 3


@pytest.mark.slow
def test_missing_files_error_or_skip(tmp_path, capsys):
    root, train, _ = make_list_dataset(tmp_path, missing=7)
    out = tmp_path / "out"
    assert build("list", "--root", root, "--list", f"train={train}", "--out", out) == 2
    err = capsys.readouterr().err
    assert "7 image files are missing" in err and "gone0.jpg" in err and "gone6.jpg" not in err
    assert not out.exists()
    assert (
        build("list", "--root", root, "--list", f"train={train}", "--out", out, "--skip-missing")
        == 0
    )
    excluded = load_manifest(out)["excluded"]
    assert len(excluded) == 7 and excluded[0]["reason"] == "missing file"


def test_labels_out_of_range_and_empty_classes_are_errors(tmp_path, capsys):
    root, train, _ = make_list_dataset(tmp_path)
    lists = ("list", "--root", root, "--list", f"train={train}", "--out", tmp_path / "o")
    assert build(*lists, "--num-classes", 2) == 2
    assert "labels outside [0, 2)" in capsys.readouterr().err
    assert build(*lists, "--num-classes", 5) == 2
    assert "no training image: [3, 4]" in capsys.readouterr().err
    train.write_text("just-a-path\n")
    assert build(*lists) == 2
    assert "train.txt:1" in capsys.readouterr().err


@pytest.mark.slow
def test_inat_json(tmp_path):
    root = tmp_path / "inat"
    paths = write_image_tree(root / "train_val2018", {"Plantae": 3, "Aves": 2})
    doc = {
        "images": [{"id": i, "file_name": str(p.relative_to(root))} for i, p in enumerate(paths)],
        "annotations": [
            {"image_id": i, "category_id": 40 if "Plantae" in str(p) else 7}
            for i, p in enumerate(paths)
        ],
        "categories": [{"id": 40, "name": "Plantae"}, {"id": 7, "name": "Aves"}],
    }
    ann = tmp_path / "train2018.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert build("inat", "--root", root, "--annotations", f"train={ann}", "--out", out) == 0
    manifest = load_manifest(out)
    assert manifest["class_names"] == ["Aves", "Plantae"]  # sorted by category id
    assert manifest["splits"]["train"]["class_counts"] == [2, 3]


@pytest.mark.slow
def test_synthetic_counts_and_rebuild_is_a_no_op(tmp_path, capsys):
    out = tmp_path / "syn"
    args = [
        "synthetic",
        "--num-classes",
        5,
        "--imbalance-factor",
        10,
        "--max-per-class",
        40,
        "--val-per-class",
        3,
        "--test-per-class",
        4,
        "--out",
        out,
        "--shard-size",
        16,
    ]
    assert build(*args) == 0
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["class_counts"] == long_tailed_counts(40, 5, 10)
    assert manifest["splits"]["val"]["class_counts"] == [3] * 5
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build(*args) == 0
    assert "up to date" in capsys.readouterr().err
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert build(*args[:-2], "--shard-size", 8) == 2
    assert "other arguments" in capsys.readouterr().err
    assert build(*args[:-2], "--shard-size", 8, "--force") == 0
    train = sum(long_tailed_counts(40, 5, 10))
    assert len(load_manifest(out)["splits"]["train"]["shards"]) == -(-train // 8)


@pytest.mark.slow
def test_same_arguments_give_the_same_bytes(tmp_path):
    for name in "ab":
        build("synthetic", "--num-classes", 3, "--max-per-class", 20, "--out", tmp_path / name)
    shas = [
        [s["sha256"] for s in load_manifest(tmp_path / n)["splits"]["train"]["shards"]]
        for n in "ab"
    ]
    assert shas[0] == shas[1]


@pytest.mark.slow
def test_interrupted_build_never_looks_complete(tmp_path):
    out = tmp_path / "big"
    cmd = [
        sys.executable,
        "-m",
        "gala_scale.shards",
        "build",
        "synthetic",
        "--num-classes",
        "10",
        "--max-per-class",
        "3000",
        "--imbalance-factor",
        "2",
        "--image-size",
        "64",
        "--workers",
        "1",
        "--shard-size",
        "100",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".big.partial-*/train/*.tar")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".big.partial-*")), "the build ended before it was interrupted"
    assert not out.exists()
    # A rerun cleans the dead build's partial folder up and completes.
    cmd[cmd.index("3000")] = "30"
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    assert load_manifest(out)["splits"]["train"]["num_samples"] > 0
    assert not list(tmp_path.glob(".big.partial-*"))


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sets") / "syn"
    assert (
        main(
            [
                "build",
                "synthetic",
                "--num-classes",
                "6",
                "--max-per-class",
                "50",
                "--imbalance-factor",
                "10",
                "--shard-size",
                "23",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow
def test_webdataset_and_dali_read_the_same_samples(synthetic_set):
    import webdataset as wds
    from nvidia.dali import fn, pipeline_def

    manifest = load_manifest(synthetic_set)
    shards = manifest["splits"]["train"]["shards"]
    tars = [str(synthetic_set / s["file"]) for s in shards]
    via_wds = {(s["__key__"], s["cls"]) for s in wds.WebDataset(tars, shardshuffle=False).decode()}

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def reader():
        jpg, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=[str(synthetic_set / s["index"]) for s in shards],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            pad_last_batch=True,
            name="reader",
        )
        return cls, fn.get_property(jpg, key="source_info")

    pipe = reader()
    pipe.build()
    size = pipe.epoch_size("reader")
    via_dali = set()
    while len(via_dali) < size:
        cls, info = pipe.run()
        for i in range(len(cls)):
            member = bytes(np.array(info[i])).decode().rsplit(":", 1)[1]
            via_dali.add((member.split(".")[0], int(bytes(np.array(cls[i])))))
    assert size == manifest["splits"]["train"]["num_samples"] == len(via_wds)
    assert via_dali == via_wds
    counts = Counter(label for _, label in via_wds)
    assert [counts[k] for k in range(6)] == manifest["splits"]["train"]["class_counts"]


@pytest.mark.slow
def test_index_adopts_webdataset_shard_writer_output(tmp_path):
    import webdataset as wds

    root = tmp_path / "mine"
    (root / "train").mkdir(parents=True)
    with wds.ShardWriter(str(root / "train" / "part-%04d.tar"), maxcount=5) as sink:
        for i in range(12):
            sink.write({"__key__": f"s{i:03d}", "jpg": jpeg_bytes(random_rgb(i)), "cls": i % 3})
    assert main(["index", str(root)]) == 0
    manifest = load_manifest(root)
    assert manifest["splits"]["train"]["class_counts"] == [4, 4, 4]
    assert len(manifest["splits"]["train"]["shards"]) == 3
    assert all((root / s["index"]).is_file() for s in manifest["splits"]["train"]["shards"])
    assert main(["verify", str(root), "--workers", "1"]) == 0


@pytest.mark.slow
def test_verify_catches_a_flipped_byte(synthetic_set, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_set, copy)
    assert main(["verify", str(copy)]) == 0
    shard = copy / load_manifest(copy)["splits"]["test"]["shards"][1]["file"]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    assert f"{shard.relative_to(copy)}: sha256 differs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"real CIFAR-10 not at {CIFAR10}")
def test_real_cifar10_lt_if100(tmp_path):
    for name in ("train.tar", "test.tar"):
        with tarfile.open(CIFAR10 / name) as tar:
            tar.extractall(tmp_path / "cifar10", filter="data")
    out = tmp_path / "cifar10_lt_if100"
    argv = ["cifar", "--root", tmp_path / "cifar10", "--imbalance-factor", 100, "--out", out]
    assert build(*argv, "--val-from", "leftover") == 0
    manifest = load_manifest(out)
    assert manifest["class_names"][:3] == ["airplane", "automobile", "bird"]
    assert manifest["splits"]["train"]["num_samples"] == 12406  # the literature's count
    assert manifest["splits"]["train"]["class_counts"] == long_tailed_counts(5000, 10, 100)
    assert manifest["splits"]["test"]["class_counts"] == [1000] * 10
    assert manifest["splits"]["val"]["class_counts"] == [0] + [50] * 9
    assert manifest["excluded"] == []
    keys = keys_by_split(out)
    assert not keys["val"] & keys["train"]


@pytest.mark.slow
def test_imagefolder_val_fraction_and_cifar100_default(tmp_path):
    root = tmp_path / "folder"
    write_image_tree(root, {"a": 20, "b": 10})
    assert (
        build("imagefolder", "--root", root, "--val-fraction", "0.2", "--out", tmp_path / "o") == 0
    )
    manifest = load_manifest(tmp_path / "o")
    assert manifest["splits"]["val"]["class_counts"] == [4, 2]
    assert manifest["splits"]["train"]["class_counts"] == [16, 8]
    from gala_scale.shards.sources import cifar_val_default

    assert (cifar_val_default(10), cifar_val_default(100)) == (50, 10)
