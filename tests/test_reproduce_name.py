"""The name a sweep's runs, report and raw figures go under: the imbalance factor of its data."""

import argparse
import json
from pathlib import Path

import pytest

from gala_scale import reproduce


def _args(**kw) -> argparse.Namespace:
    base = {"config": Path("configs/cifar10_lt_if100_lite0.yaml"), "root": None, "shards": None}
    return argparse.Namespace(**{"imbalance_factor": None, **base, **kw})


def _shards(tmp_path: Path, build: dict | None) -> Path:
    folder = tmp_path / "set"
    folder.mkdir()
    manifest = {"format_version": 1, "dataset": "c10", "num_classes": 10, "image_ext": "jpg"}
    manifest |= {"class_names": [str(i) for i in range(10)], "splits": {}, "build": build}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("build", "name"),
    [
        ({"imbalance_factor": 10.0}, "cifar10_lt_if10_lite0"),  # an IF 10 set, an IF 100 config
        ({"imbalance_factor": 100.0}, "cifar10_lt_if100_lite0"),
        ({"imbalance_factor": "50"}, "cifar10_lt_if50_lite0"),
        ({"imbalance_factor": 12.5}, "cifar10_lt_if12.5_lite0"),
        ({"imbalance_factor": None}, "cifar10_lt_if100_lite0"),  # not built from CIFAR by us
        (None, "cifar10_lt_if100_lite0"),
        ("not a mapping", "cifar10_lt_if100_lite0"),
    ],
)
def test_existing_shards_name_the_factor_they_were_built_with(tmp_path, build, name):
    assert reproduce._name(_args(shards=_shards(tmp_path, build))) == name


def test_a_manifest_that_is_not_json_leaves_the_config_name(tmp_path):
    folder = _shards(tmp_path, None)
    (folder / "manifest.json").write_text("{ not json")
    assert reproduce._name(_args(shards=folder)) == "cifar10_lt_if100_lite0"


def test_root_names_the_factor_asked_for_and_no_shards_the_config():
    assert reproduce._name(_args(root=Path("raw"), imbalance_factor=50)) == "cifar10_lt_if50_lite0"
    assert reproduce._name(_args()) == "cifar10_lt_if100_lite0"
