import json

import torch

from gala_scale.bench import loss as bench_loss
from gala_scale.bench.__main__ import main
from gala_scale.losses import GALALoss


def test_python_loop_baseline_does_the_same_accumulation():
    log_p = torch.log_softmax(torch.randn(16, 9, generator=torch.Generator().manual_seed(0)), 1)
    labels = torch.arange(16) % 9
    theta, phi = torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)
    bench_loss.python_loop_update(theta, phi, log_p, labels)
    loss = GALALoss(9)
    loss._accumulate(log_p, labels)
    torch.testing.assert_close(theta, loss.theta, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(phi, loss.phi, rtol=1e-6, atol=1e-7)


def test_loss_benchmark_prints_json_last(capsys):
    assert main(["loss", "--repeats", "1", "--loop-repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "loss"
    assert result["linear_k8142"]["gala_step_s"] > 0
    assert set(result["goals_met"]) == {"gala_step_le_1.03x_ce", "ledger_ge_100x_loop"}


def test_shards_benchmark_builds_with_one_and_all_cores(capsys):
    assert main(["shards", "--kind", "synthetic", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 1236 + 200 + 1000  # the synthetic default's three splits
    assert result["1_process_images_per_s"] > 0 and result["speedup"] > 0
