"""kill -9 at random instants of a run, resumed each time: it ends as the uninterrupted run did.

A seeded loop: each episode trains a fresh run directory, killing the trainer at instants drawn
over an uninterrupted run's duration and resuming it with ``--resume auto`` after every kill; after
``PER_EPISODE`` kills the next attempt is left to finish. Episodes repeat until
``GALA_CHAOS_KILLS`` kills (20 in the suite, over three episodes or a few more: most of the
loop's time goes to kills, not to finishing runs; ``python -m pytest tests/test_chaos.py`` with a
larger value is the benchmark setting). After every kill ``best/`` and ``final/`` are whole
wherever they were published before, and every finished episode has the ledger and the test
results of the uninterrupted run (the session's ``trained_run``, same arguments), tested on its
best-on-val weights.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from train_helpers import ENV, ROOT, debug_overrides, ranks, results

pytestmark = pytest.mark.slow
KILLS = int(os.environ.get("GALA_CHAOS_KILLS", "20"))
PER_EPISODE = 7


def whole(folder) -> bool:
    """A weights folder as save_weights publishes it: weights, ledger and info, all readable."""
    try:
        load_file(folder / "model.safetensors")
        load_file(folder / "ledger.safetensors")
        json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def start(args, log):
    """One attempt, its stderr to ``log`` (a pipe nobody reads while it runs could fill)."""
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "gala_scale.train", *args, "--resume", "auto"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def test_kill_9_at_random_instants_and_resume_ends_as_the_uninterrupted_run(
    synthetic_shards, trained_run, tmp_path
):
    rng, kills, episodes, duration = random.Random(29), 0, 0, 10.0
    while kills < KILLS:
        run_dir = tmp_path / f"episode{episodes}"
        args = debug_overrides(synthetic_shards, run_dir)
        published: set[str] = set()
        in_episode = 0
        while True:
            began, proc = time.monotonic(), start(args, tmp_path / "attempt.log")
            try:
                # Within the first 70 % of a whole run's time, drawn again for each attempt
                # until PER_EPISODE kills; an attempt that ends first ends the episode.
                limit = rng.uniform(0.5, 0.7 * duration) if in_episode < PER_EPISODE else None
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills, in_episode = kills + 1, in_episode + 1
                for name in ("best", "final"):
                    if (run_dir / name).exists():
                        published.add(name)
                    if name in published:  # once published, always there and whole
                        assert whole(run_dir / name), f"{name}/ after kill {kills}"
                continue
            assert proc.returncode == 0, (tmp_path / "attempt.log").read_text()[-3000:]
            duration = max(duration, time.monotonic() - began)
            break
        episodes += 1
        assert ranks(run_dir)[0]["ledger_sha256"] == ranks(trained_run)[0]["ledger_sha256"]
        assert results(run_dir)["test"] == results(trained_run)["test"]
        assert results(run_dir)["weights"] == "best"
        best = json.loads((run_dir / "best" / "info.json").read_text())["epoch"]
        assert results(run_dir)["best_epoch"] == best == results(trained_run)["best_epoch"]
        assert not list(run_dir.glob(".*tmp*")) and not list(run_dir.glob(".*old*"))
        assert not list((run_dir / "checkpoints").glob(".*"))  # no killed save's leftovers
    print(f"\nchaos: {kills} kills over {episodes} episodes, each ended as the uninterrupted run")
