"""The serve-then-batch helper (gala_scale.serving) that quickstart and rehearse use: the error of
the block is the one the user sees, and no server outlives it."""

import subprocess
import sys
import time

import pytest

from gala_scale.serving import send, serving, stop

pytestmark = pytest.mark.slow

DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


def test_an_error_inside_the_block_propagates_and_the_server_is_gone(artifact, tmp_path):
    started = []
    with (
        pytest.raises(ValueError, match="no-such-set"),
        serving(artifact, "--providers", "cpu", ready_s=120) as server,
    ):
        started.append(server.process)
        send(server, tmp_path / "no-such-set", tmp_path / "out.jsonl")
    assert started and started[0].poll() is not None


def test_a_server_deaf_to_sigterm_is_killed_after_the_grace_and_nothing_is_raised():
    process = subprocess.Popen([sys.executable, "-c", DEAF])
    time.sleep(1.0)  # its handler installed
    start = time.monotonic()
    stop(process, grace_s=1.0)
    assert process.returncode == -9 and time.monotonic() - start < 10


def test_a_block_that_succeeds_returns_the_batch_summary(artifact, synthetic_shards, tmp_path):
    with serving(artifact, "--providers", "cpu", grpc=True, ready_s=120) as server:
        summary = send(server, synthetic_shards, tmp_path / "out.jsonl", use_grpc=True)
        process = server.process
    assert process.poll() is not None
    assert summary["images"] == 120 and summary["errors"] == 0 and 0 <= summary["top1"] <= 1
