import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import (
    ROOT,
    debug_overrides,
    explain,
    ledger,
    ranks,
    results,
    run_accelerate,
    run_single,
    train_losses,
    weights,
)

from gala_scale.config import ConfigError, load_config
from gala_scale.runlog import RunLog


@pytest.fixture(scope="session")
def shards(synthetic_shards):
    return synthetic_shards


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """One process, 3 epochs, ledger synced every step, consuming two ranks' batches."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = run_single(
        debug_overrides(shards, run_dir, "train.sync_every_steps=1", "train.emulate_world=2")
    )
    assert proc.returncode == 0, explain(proc)
    return run_dir


def assert_same_training(run_dir, reference):
    """Ranks agree exactly; ledger and weights equal the one-process run's up to rounding."""
    records = ranks(run_dir)
    assert len(records) == 2 and {r["rank"] for r in records} == {0, 1}
    assert records[0]["ledger_sha256"] == records[1]["ledger_sha256"]
    for key, value in ledger(run_dir).items():
        torch.testing.assert_close(value, ledger(reference)[key], rtol=1e-6, atol=1e-4)
    assert ledger(run_dir)["theta"].sum() > 0
    mine, ref = weights(run_dir), weights(reference)
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-4, atol=1e-5)
    # The logged loss is the mean over both ranks' samples, as the one process that took both
    # ranks' batches logged it (not rank 0's own mean).
    logged = [train_losses(run_dir), train_losses(reference)]
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)


def test_config_layers_and_errors(tmp_path):
    cfg = load_config(ROOT / "configs" / "cifar100_lt_if50.yaml", ["train.epochs=3", "seed=4"])
    assert (cfg.train.epochs, cfg.seed, cfg.model.name, cfg.optim.lr) == (3, 4, "resnet32", 0.05)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.shards=x", "data.shard=y", "train.epochs=many", "loss.name=focus"])
    text = str(err.value)
    assert "data.shard: unknown key" in text and "train.epochs: expected int" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  shards: s\nloss:\n  name: focus\n")
    with pytest.raises(ConfigError, match=r"loss\.name: 'focus' is not one of"):
        load_config(bad)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.shards=x", "loss.ledger_init=prior", "loss.ledger_init_scale=0"])
    assert "loss.ledger_init: 'prior' is not one of zeros, counts" in str(err.value)
    assert "loss.ledger_init_scale: must be > 0, got 0" in str(err.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.data.shards


@pytest.mark.slow
def test_bad_config_on_the_command_line_exits_2(shards, tmp_path):
    proc = run_single(debug_overrides(shards, tmp_path / "r", "train.epochs=zero"))
    assert proc.returncode == 2 and "train.epochs: expected int" in proc.stderr


@pytest.mark.slow
def test_single_process_run_directory(shards, reference):
    run_dir = reference
    record = ranks(run_dir)[0]
    assert record["device"] == "cpu" and record["mixed_precision"] == "no"
    assert record["loader"] == "dali" and "peak_gpu_mib" not in record
    config = (run_dir / "config.yaml").read_text()
    assert "emulate_world: 2" in config and (run_dir / "git_revision.txt").read_text().strip()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "train"] == [0, 1, 2]
    assert [r["epoch"] for r in records if r["type"] == "val"] == [0, 1, 2]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    checkpoint = run_dir / "checkpoints" / "e0003-s000000"
    for name in (
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "train_state.json",
        "custom_checkpoint_0.pkl",
        "custom_checkpoint_1.pkl",
    ):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "train_state.json").read_text())["epoch"] == 3
    assert set(weights(run_dir, "best")) == set(weights(run_dir, "final"))  # safetensors, no pickle
    for plot in ("per_class_accuracy", "positive_predictions", "ledger", "reliability", "training"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    res = results(run_dir)
    fixed = ["plain", "PN, val scales, tau 1", "PN, transductive on test, tau 1"]
    assert list(res["test"])[:3] == fixed and len(res["test"]) == 5
    assert [k.rsplit(" ", 1)[0] for k in list(res["test"])[3:]] == [
        "post-hoc LA, val tau",
        "tau-norm, val tau",
    ]
    assert all(0 <= v["ece"] <= 1 for v in res["test"].values())
    with open(run_dir / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["class"]) for r in rows] == list(range(6))
    for name, variant in res["test"].items():
        assert [float(r[f"accuracy: {name}"]) for r in rows] == pytest.approx(variant["per_class"])
        predicted = [int(r[f"predicted: {name}"]) for r in rows]
        assert predicted == variant["positive_predictions"] and sum(predicted) == 120
    assert res["test_samples"] == 120 and res["weights"] == "best"
    pn = json.loads((run_dir / "pn.json").read_text())
    assert len(pn["scales"]) == 6 and pn["fitted_on"] == "val"
    history = RunLog(run_dir, False, 0).ledger_history()
    assert history["theta"].shape == history["phi"].shape == (3, 6)
    assert (np.diff(history["theta"], axis=0) >= 0).all()  # the ledger only accumulates
    np.testing.assert_array_equal(history["theta"][-1], ledger(run_dir, "final")["theta"].numpy())


def resume_after_epoch_one(shards, reference, resumed, *extra):
    """Resume a copy of ``reference`` as if killed right after epoch 1; it must end the same."""
    shutil.copytree(reference, resumed)
    for later in ("e0002-s000000", "e0003-s000000"):
        shutil.rmtree(resumed / "checkpoints" / later)
    # What a kill right after that checkpoint leaves: best/ as of epoch 0 (the reference's own
    # best/ when val chose epoch 0; else a later epoch's, which the resumed run selects again).
    best = json.loads((reference / "best" / "info.json").read_text())["epoch"]
    gone = ["final", "results.json", "pn.json", "plots", "ranks"] + (["best"] if best else [])
    for done in gone:
        path = resumed / done
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    args = debug_overrides(
        shards, resumed, "train.sync_every_steps=1", "train.emulate_world=2", *extra
    )
    proc = run_single([*args, "--resume", "auto"])
    assert proc.returncode == 0, explain(proc)
    assert "resuming from" in proc.stdout + proc.stderr
    for key, value in ledger(reference).items():
        torch.testing.assert_close(ledger(resumed)[key], value, rtol=1e-12, atol=1e-9)
    for key, value in weights(reference).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=0)
    assert results(resumed)["test"] == results(reference)["test"]
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 0, 1, 1, 2, 2]  # no duplicated epochs


@pytest.mark.slow
def test_resume_after_an_epoch_ends_like_an_uninterrupted_run(shards, reference, tmp_path):
    resume_after_epoch_one(shards, reference, tmp_path / "resumed")


SUM_OF_SUMS = "loss.ledger=sum_of_sums"


@pytest.mark.slow
def test_sum_of_sums_two_processes_equal_one_and_resume_exactly(shards, tmp_path, port):
    """The authors' accumulation through the trainer: the ledger file, the history and the
    plot carry S, two DDP processes synced every step equal one process on both ranks'
    batches, and a resume after epoch 1 ends with the same S."""
    reference = tmp_path / "reference"
    args = ("train.sync_every_steps=1", SUM_OF_SUMS)
    proc = run_single(debug_overrides(shards, reference, *args, "train.emulate_world=2"))
    assert proc.returncode == 0, explain(proc)
    final = ledger(reference)
    assert set(final) == {"theta", "phi", "s_theta", "s_phi"}
    assert (final["s_theta"] > 2 * final["theta"]).all()  # S counts early increments often
    history = RunLog(reference, False, 0).ledger_history()
    assert history["s_theta"].shape == (3, 6)
    assert (np.diff(history["s_theta"], axis=0) >= history["theta"][:-1]).all()
    assert (reference / "plots" / "ledger.png").stat().st_size > 0
    train = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["type"] == "train"]
    spread = np.log(final["s_theta"] + 1e-3)
    assert train[-1]["ledger"] == "sum_of_sums"
    assert train[-1]["ledger_log_range"] == pytest.approx(float(spread.max() - spread.min()))

    run_dir = tmp_path / "ddp"
    proc = run_accelerate(debug_overrides(shards, run_dir, *args), port)
    assert proc.returncode == 0, explain(proc)
    assert_same_training(run_dir, reference)
    resume_after_epoch_one(shards, reference, tmp_path / "resumed", SUM_OF_SUMS)


@pytest.mark.slow
def test_existing_checkpoints_need_resume_auto(shards, reference):
    proc = run_single(debug_overrides(shards, reference))
    assert proc.returncode == 2 and "--resume auto" in proc.stderr


@pytest.mark.slow
def test_two_processes_ddp_equal_one_process(shards, reference, tmp_path, port):
    run_dir = tmp_path / "ddp"
    proc = run_accelerate(debug_overrides(shards, run_dir, "train.sync_every_steps=1"), port)
    assert proc.returncode == 0, explain(proc)
    assert_same_training(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_deepspeed_two_processes_equal_one_process(shards, reference, tmp_path, port, stage):
    run_dir = tmp_path / stage
    proc = run_accelerate(
        debug_overrides(shards, run_dir, "train.sync_every_steps=1"), port, deepspeed=stage
    )
    assert proc.returncode == 0, explain(proc)
    assert_same_training(run_dir, reference)
    checkpoint = run_dir / "checkpoints" / "e0003-s000000"
    assert (checkpoint / "latest").is_file() and (checkpoint / "pytorch_model").is_dir()


@pytest.mark.slow
def test_deepspeed_resume(shards, tmp_path, port):
    run_dir = tmp_path / "ds"
    args = debug_overrides(shards, run_dir)
    assert run_accelerate(args, port, deepspeed="zero2").returncode == 0
    full = ledger(run_dir)
    for later in ("e0002-s000000", "e0003-s000000"):
        shutil.rmtree(run_dir / "checkpoints" / later)
    shutil.rmtree(run_dir / "final")
    proc = run_accelerate([*args, "--resume", "auto"], port, deepspeed="zero2")
    assert proc.returncode == 0, explain(proc)
    assert "resuming from" in proc.stdout + proc.stderr
    torch.testing.assert_close(ledger(run_dir)["theta"], full["theta"], rtol=1e-12, atol=1e-9)


@pytest.mark.slow
def test_two_machines_on_loopback(shards, reference, tmp_path, port):
    run_dir = tmp_path / "machines"
    args = debug_overrides(shards, run_dir, "train.sync_every_steps=1")
    from train_helpers import ENV, accelerate_cmd

    procs = [
        subprocess.Popen(
            [*accelerate_cmd(port, machines=2, machine_rank=r), *args],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
    assert_same_training(run_dir, reference)


def test_train_command_parses_as_the_launch_it_means():
    """Every tool's and test's launch line, read back by Accelerate's own argument parser."""
    from accelerate.commands.launch import launch_command_parser

    from gala_scale.launch import ACCELERATE_LAUNCH, train_command

    assert train_command(1, 29500) == [sys.executable, "-m", "gala_scale.train"]
    parse = launch_command_parser().parse_args
    node = train_command(2, 29501, "zero2.json", machines=2, machine_rank=1, script="run.py")
    assert tuple(node[:3]) == ACCELERATE_LAUNCH
    args = parse(node[3:])
    assert (args.num_machines, args.machine_rank, args.main_process_ip) == (2, 1, "127.0.0.1")
    assert (args.num_processes, args.main_process_port) == (2, 29501)
    assert args.use_deepspeed and args.deepspeed_config_file == "zero2.json"
    # Without the standard launcher, Accelerate starts the other nodes through pdsh (ssh).
    assert args.deepspeed_multinode_launcher == "standard"
    assert args.training_script == "run.py" and not args.module
    with pytest.raises(ValueError, match="3 processes do not divide over 2 machines"):
        train_command(3, 29502, machines=2)
    ddp = parse(train_command(2, 29503, precision="bf16", module="gala_scale.bench.step")[3:])
    assert ddp.multi_gpu and not ddp.cpu and ddp.mixed_precision == "bf16"
    assert (ddp.module, ddp.training_script, ddp.num_machines) == (True, "gala_scale.bench.step", 1)


@pytest.mark.slow
def test_one_process_cpu_launch_is_refused(shards, tmp_path, port):
    """Through the `accelerate` CLI itself, the command a user types (the tools and the other
    tests start the same launcher as ``python -m accelerate.commands.launch``)."""
    from train_helpers import BIN, ENV

    proc = subprocess.run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            "-m",
            "gala_scale.train",
            *debug_overrides(shards, tmp_path / "trap"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode != 0
    assert "error: `accelerate launch --cpu` starts one process" in proc.stderr
    assert (tmp_path / "trap" / "exit_status").read_text() == "2\n"  # not requeued
    assert not (tmp_path / "trap" / "checkpoints").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_the_run(shards, tmp_path):
    run_dir = tmp_path / "nan"
    proc = run_single(debug_overrides(shards, run_dir, "optim.lr=1e30", "train.epochs=2"))
    assert proc.returncode == 3, explain(proc)  # EXIT_FAILED: not requeued by the Slurm script
    assert "NaN or infinite on 1 of 1 rank(s)" in proc.stderr
    assert (run_dir / "exit_status").read_text() == "3\n"
    assert not (run_dir / "checkpoints").exists()  # nothing written after the loss broke


@pytest.fixture(scope="module")
def fp32_bn(shards, tmp_path_factory):
    """A BatchNorm model trained one epoch in fp32 with two DDP processes."""
    run_dir = tmp_path_factory.mktemp("fp32") / "run"
    args = debug_overrides(
        shards, run_dir, "model.name=tiny_bn", "train.epochs=1", "optim.warmup_epochs=0"
    )
    from conftest import free_port

    proc = run_accelerate([*args, "train.precision=no"], free_port())
    assert proc.returncode == 0, explain(proc)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "zero1", "zero2"])
def test_bf16_trains_a_batchnorm_model_with_fp32_weights(shards, fp32_bn, tmp_path, port, launcher):
    run_dir = tmp_path / launcher
    args = debug_overrides(
        shards, run_dir, "model.name=tiny_bn", "train.epochs=1", "optim.warmup_epochs=0"
    )
    deepspeed = None if launcher == "ddp" else launcher
    proc = run_accelerate([*args, "train.precision=bf16"], port, deepspeed=deepspeed, bf16=True)
    assert proc.returncode == 0, explain(proc)
    assert {r["mixed_precision"] for r in ranks(run_dir)} == {"bf16"}
    for which in ("best", "final"):
        tensors = weights(run_dir, which).values()
        assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
    # bf16 arithmetic really ran (the loss moved) and learned like fp32 did.
    (mine,), (fp32,) = train_losses(run_dir), train_losses(fp32_bn)
    assert mine != fp32 and mine == pytest.approx(fp32, rel=0.05)


@pytest.mark.gpu
def test_one_gpu_run_trains_on_cuda_in_bf16_with_dali_mixed(shards, tmp_path):
    from train_helpers import GPU_ENV

    run_dir = tmp_path / "gpu"
    proc = run_single(debug_overrides(shards, run_dir), env=GPU_ENV)
    assert proc.returncode == 0, explain(proc)
    record = ranks(run_dir)[0]
    assert record["device"].startswith("cuda") and record["mixed_precision"] == "bf16"
    assert record["loader"] == "dali" and record["peak_gpu_mib"] > 0
    assert ledger(run_dir)["theta"].dtype == torch.float64 and ledger(run_dir)["theta"].sum() > 0
    assert results(run_dir)["test_samples"] == 120


@pytest.mark.slow
def test_eval_every_0_scores_val_once_at_the_end(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.epochs=2", "train.eval_every=0", "data.test_split="]
    proc = run_single(debug_overrides(shards, run_dir, *args))
    assert proc.returncode == 0, explain(proc)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "val"] == [1]
    assert json.loads((run_dir / "best" / "info.json").read_text())["epoch"] == 1


@pytest.mark.slow
def test_importing_the_trainer_leaves_the_heavy_optional_imports_to_their_users():
    """Every process that starts the trainer (each rank, each Slurm node's config read) pays for
    its imports: torchvision (with torch._dynamo) comes with a torchvision model's build, timm with
    the optimizer's groups, matplotlib with the plots; importing the module brings none."""
    code = "import sys, gala_scale.train; print(*sorted(set(sys.modules) & set(sys.argv[1:])))"
    heavy = ["torchvision", "torch._dynamo", "timm", "matplotlib"]
    from train_helpers import ENV, ROOT

    out = subprocess.run(
        [sys.executable, "-c", code, *heavy], capture_output=True, text=True, cwd=ROOT, env=ENV
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == []
