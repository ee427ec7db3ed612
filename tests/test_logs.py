"""The library logs through ``logging`` with time, level and rank; results stay on stdout."""

import re
import shutil

import pytest
from train_helpers import debug_overrides, explain, run_single, train_losses

RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) gala_scale\.\w+: \[RANK 0\] ")


@pytest.mark.slow
def test_a_runs_messages_are_log_records_and_its_table_is_on_stdout(
    synthetic_shards, trained_run, tmp_path
):
    """A copy of the session's finished run, resumed: nothing left to train, the report again."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    proc = run_single([*debug_overrides(synthetic_shards, run_dir), "--resume", "auto"])
    assert proc.returncode == 0, explain(proc)
    records = [line for line in proc.stderr.splitlines() if RECORD.match(line)]
    assert any("gala_scale.train: [RANK 0] resuming from" in line for line in records), proc.stderr
    assert "resuming from" not in proc.stdout
    assert "PN, val scales, tau 1" in proc.stdout  # the results table: the command's result


@pytest.mark.slow
def test_one_config_key_sends_the_metrics_to_mlflow(synthetic_shards, tmp_path, monkeypatch):
    """MLflow (installed with the test extras) on a local file store: no network."""
    import mlflow
    from train_helpers import ENV

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setitem(ENV, "MLFLOW_TRACKING_URI", store)
    monkeypatch.setitem(ENV, "MLFLOW_ALLOW_FILE_STORE", "true")  # sqlite would need SQLAlchemy
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # and for the client here
    args = ["train.tracker=mlflow", "train.epochs=2", "data.test_split="]
    proc = run_single(debug_overrides(synthetic_shards, tmp_path / "run", *args))
    assert proc.returncode == 0, explain(proc)
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tb"]
    (run,) = client.search_runs([experiment.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [0, 1]
    assert [m.value for m in losses] == pytest.approx(train_losses(tmp_path / "run"))
    assert not (tmp_path / "run" / "tb").exists()  # this run's tracker only


def test_a_tracker_that_is_not_installed_is_a_config_error(synthetic_shards, tmp_path, capsys):
    from gala_scale.rundir import EXIT_CONFIG
    from gala_scale.train import main

    code = main(debug_overrides(synthetic_shards, tmp_path / "run", "train.tracker=swanlab"))
    assert code == EXIT_CONFIG
    assert "train.tracker: 'swanlab' is not installed here" in capsys.readouterr().err
    assert (tmp_path / "run" / "exit_status").read_text() == "2\n"  # the Slurm script's cue
