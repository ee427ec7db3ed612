"""The run's log: the ledger history is appended an epoch, and a resume forgets what it redoes."""

import numpy as np

from gala_scale.runlog import LEDGER, RunLog


def epoch_ledger(epoch: int, k: int = 5) -> dict[str, np.ndarray]:
    return {"theta": np.arange(k) + 10.0 * epoch, "phi": np.arange(k) * 2 + 10.0 * epoch}


def test_each_epoch_appends_one_row_and_a_resume_truncates(tmp_path):
    log = RunLog(tmp_path, True, 0)
    sizes = []
    for epoch in range(4):
        log.append_ledger(epoch_ledger(epoch))
        sizes.append((tmp_path / LEDGER / "theta.f64").stat().st_size)
    log.close()
    assert np.diff(sizes).tolist() == [5 * 8] * 3  # a row an epoch, the history not rewritten
    history = RunLog(tmp_path, False, 0).ledger_history()
    np.testing.assert_array_equal(
        history["phi"], np.stack([epoch_ledger(e)["phi"] for e in range(4)])
    )

    resumed = RunLog(tmp_path, True, 2)  # resuming at epoch 2: epochs 2 and 3 run again
    assert RunLog(tmp_path, False, 0).ledger_history()["theta"].shape == (2, 5)
    resumed.append_ledger(epoch_ledger(7))
    resumed.close()
    history = RunLog(tmp_path, False, 0).ledger_history()
    np.testing.assert_array_equal(history["theta"][-1], epoch_ledger(7)["theta"])
    assert history["theta"].shape == (3, 5)


def test_a_row_not_in_every_file_is_left_out(tmp_path):
    log = RunLog(tmp_path, True, 0)
    log.append_ledger(epoch_ledger(0))
    log.close()
    with open(tmp_path / LEDGER / "theta.f64", "ab") as f:  # stopped after theta, before phi
        f.write(np.zeros(5).tobytes())
    history = RunLog(tmp_path, False, 0).ledger_history()
    assert history["theta"].shape == history["phi"].shape == (1, 5)


def test_another_ledger_starts_the_history_afresh(tmp_path):
    log = RunLog(tmp_path, True, 0)
    log.append_ledger(epoch_ledger(0))
    log.append_ledger({**epoch_ledger(1), "s_theta": np.ones(5), "s_phi": np.ones(5)})
    log.close()
    history = RunLog(tmp_path, False, 0).ledger_history()
    assert set(history) == {"theta", "phi", "s_theta", "s_phi"} and len(history["theta"]) == 1
