"""Errors that a restart would repeat end the trainer with the no-requeue code and one line that
names the key, file or sample: exit 2 for the configuration and the data set's shape, found at
start-up before any data is read; exit 3 for a sample that fails mid-run."""

import json
import shutil

import pytest
from shard_fixtures import corrupt_an_image
from train_helpers import ROOT, debug_overrides, run_single

from gala_scale.rundir import EXIT_CONFIG, EXIT_FAILED
from gala_scale.shards.manifest import ManifestError
from gala_scale.train import main


@pytest.fixture(scope="module")
def broken_sets(synthetic_shards, tmp_path_factory):
    """Copies of the shared set: one with a shard file gone, one whose manifest gives a class
    no training sample, one with an image that does not decode."""
    base = tmp_path_factory.mktemp("broken")
    missing, empty, corrupt = (base / n for n in ("missing", "empty", "corrupt"))
    for out in (missing, empty, corrupt):
        shutil.copytree(synthetic_shards, out)
    next((missing / "train").glob("*.tar")).unlink()
    manifest = json.loads((empty / "manifest.json").read_text())
    counts = manifest["splits"]["train"]["class_counts"]
    counts[0], counts[-1] = counts[0] + counts[-1], 0
    (empty / "manifest.json").write_text(json.dumps(manifest))
    corrupt_an_image(sorted((corrupt / "train").glob("*.tar"))[0])
    return {"missing": missing, "empty": empty, "corrupt": corrupt, "intact": synthetic_shards}


CASES = {
    "loss.eps=0": ("loss.eps: must be > 0, got 0", []),
    "data.color_jitter=1.5": ("data.color_jitter: must be in [0, 1), got 1.5", []),
    "optim.lr=[1,": ("optim.lr: '[1,' is not a YAML value", []),
    "autoaugment, imagenet preset": (
        "data.autoaugment: the CIFAR policy",
        ["data.autoaugment=true", "data.preset=imagenet"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_start_up_errors_exit_2_with_one_line(case, synthetic_shards, tmp_path, capsys):
    message, extra = CASES[case]
    extra = extra or [case]
    code = main(debug_overrides(synthetic_shards, tmp_path / "run", *extra))
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert message in err and "Traceback" not in err


@pytest.mark.slow  # these reach the run directory, which records the git revision (a process)
@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("missing", [], "train-000000.tar: listed in"),
        ("empty", ["loss.name=logit_adjusted"], "class_counts must be positive; classes [5]"),
        ("intact", ["data.batch_size=4096"], "fewer than one batch of 4096"),
        (
            "intact",
            ["data.autoaugment=true", "data.preset=auto", "model.name=timm/test_efficientnet"],
            "autoaugment is the CIFAR policy",
        ),
    ],
)
def test_errors_found_at_start_up_exit_2(broken_sets, which, extra, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(debug_overrides(broken_sets[which], run_dir, *extra))
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert message in err and "Traceback" not in err
    assert (run_dir / "exit_status").read_text() == "2\n"
    assert not (run_dir / "checkpoints").exists()  # nothing trained


def test_a_config_file_that_is_not_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "debug.yaml").read_text() + "train: [epochs: 3\n")
    assert main(["--config", str(bad)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{bad}: not valid YAML" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_sample_changed_after_the_build_is_named_before_training(broken_sets, tmp_path):
    """DALI's decoder can crash the process on such an image (a requeue loop): the start-up
    check finds it first, and a run that had found the set whole checks it again once changed."""
    run_dir = tmp_path / "run"
    proc = run_single(debug_overrides(broken_sets["corrupt"], run_dir))
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    assert "train-000000.tar: sample train_00000" in proc.stderr
    assert "image does not decode" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "exit_status").read_text() == "2\n"
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_an_image_that_does_not_decode_mid_run_exits_3(broken_sets, tmp_path):
    """Unchecked (data.verify: false), the torch loader meets it mid-run: exit 3, one line."""
    run_dir = tmp_path / "run"
    args = ["data.verify=false", "data.loader=torch", "data.num_workers=0"]
    proc = run_single(debug_overrides(broken_sets["corrupt"], run_dir, *args))
    assert proc.returncode == EXIT_FAILED, proc.stderr[-3000:]
    assert "image does not decode" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "exit_status").read_text() == "3\n"


def test_the_start_up_check_hashes_each_shard_once_a_run_until_it_changes(
    synthetic_shards, tmp_path, monkeypatch
):
    from gala_scale.data import verify

    data = tmp_path / "set"
    shutil.copytree(synthetic_shards, data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    splits = ["train", "val", "test"]
    todo = verify.shards_to_check(data, splits, run_dir)
    assert len(todo) == 3 and not verify.problems_of(data, todo)
    verify.remember(data, todo, run_dir)
    assert verify.shards_to_check(data, splits, run_dir) == []  # a restart hashes nothing
    tar = next((data / "train").glob("*.tar"))
    corrupt_an_image(tar)
    (again,) = verify.shards_to_check(data, splits, run_dir)
    assert again["file"] == f"train/{tar.name}"
    assert "image does not decode" in " ".join(verify.problems_of(data, [again]))
    with pytest.raises(ManifestError, match="no split 'dev'"):
        verify.shards_to_check(data, ["dev"], run_dir)


@pytest.mark.slow
def test_a_checkpoint_of_other_optimizer_groups_exits_2_naming_it(
    synthetic_shards, trained_run, tmp_path
):
    """A checkpoint whose optimizer groups are not this run's (saved by another version, here
    provoked by decaying norm and bias too) stops with one line, not requeued."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    args = debug_overrides(synthetic_shards, run_dir, "optim.decay_norm_and_bias=true")
    proc = run_single([*args, "--resume", "auto"])
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "checkpoints/" in line and "does not fit this run's" in line
    assert "Traceback" not in proc.stderr
