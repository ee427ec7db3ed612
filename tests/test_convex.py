"""The full-batch L-BFGS solve that stage 2's convergence is checked against."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gala_scale import convex


def long_tailed_features(counts, dim=6, seed=0, draw=0):
    """Gaussian classes around centres fixed by ``seed``; ``draw`` picks the samples."""
    centres = np.random.default_rng(seed).normal(size=(len(counts), dim)) * 2
    rng = np.random.default_rng([seed, draw])
    labels = np.repeat(np.arange(len(counts)), counts)
    scale = [50, 0.1, 1, 1, 5, 1][:dim]  # dimensions on very different scales
    features = (centres[labels] + rng.normal(size=(len(labels), dim)) * 1.5) * scale
    return features.astype(np.float16), labels


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("loss", ["ce", "balanced_softmax"])
def test_the_solve_is_a_stationary_point_of_loss_plus_weight_decay(loss, standardize):
    features, labels = long_tailed_features([200, 60, 15])
    x64 = torch.from_numpy(features.astype(np.float64))
    model = convex.solve(x64, labels, loss, weight_decay=1e-2, standardize=standardize)
    assert bool((model.std == 1).all()) != standardize  # raw: the identity transform
    fc = model.fc.double()
    x = (x64 - model.mean.double()) / model.std.double()
    criterion = convex.loss_of(loss, [200, 60, 15])
    y = torch.from_numpy(labels)

    def objective(weight, bias):
        logits = x @ weight.T + bias
        return criterion(logits, y).double() + 1e-2 / 2 * weight.pow(2).sum()

    weight = fc.weight.detach().clone().requires_grad_(True)
    bias = fc.bias.detach().clone().requires_grad_(True)
    best = objective(weight, bias)
    best.backward()
    # Raw features on scales 0.1 to 50 make an ill-conditioned problem: L-BFGS stops nearer.
    tolerance = 1e-5 if standardize else 1e-3
    assert weight.grad.abs().max() < tolerance and bias.grad.abs().max() < tolerance
    for seed in range(5):  # and no nearby point is lower
        g = torch.Generator().manual_seed(seed)
        w = weight.detach() + 1e-2 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
        assert objective(w, bias.detach()) > best.detach()


def test_cli_scores_each_loss_and_a_run_against_the_solve_of_its_loss(tmp_path, capsys):
    cache = tmp_path / "features" / "v"
    cache.mkdir(parents=True)
    train = long_tailed_features([300, 60, 10], seed=1)
    val = long_tailed_features([20, 20, 20], seed=1, draw=1)
    test = long_tailed_features([50, 50, 50], seed=1, draw=2)
    for name, (x, y) in (("train_view0", train), ("val", val), ("test", test)):
        np.save(cache / f"{name}.features.npy", x)
        np.save(cache / f"{name}.labels.npy", y)
    # Final weights of raw-feature runs: the balanced-softmax optimum at each weight decay, a
    # step away from it, and runs whose objective is not the solve's.
    x64 = torch.from_numpy(train[0].astype(np.float64))
    optima = {
        wd: convex.solve(x64, train[1], "balanced_softmax", wd, standardize=False).fc
        for wd in (5e-4, 50.0)
    }
    cases = {  # name: (config lines beyond the loss, weight decay of the weights, shift, bias)
        "at_optimum": ("", 5e-4, 0.0, True),
        "short": ("", 5e-4, 0.5, True),
        "heavy": ("optim:\n  weight_decay: 50\n", 50.0, 0.0, True),  # its own weight decay
        "standardized": ("stage2:\n  standardize: true\n", 5e-4, 0.0, True),
        "tau": ("", 5e-4, 0.0, True),  # logit_adjusted with a tau the solve does not take
        "cosine": ("", 5e-4, 0.0, False),  # no bias: a cosine head, no final/ figures
    }
    runs = {}
    for name, (extra, wd, shift, bias) in cases.items():
        run = tmp_path / name
        (run / "final").mkdir(parents=True)
        loss = "loss:\n  name: " + (
            "logit_adjusted\n  tau: 0.5" if name == "tau" else "balanced_softmax"
        )
        (run / "config.yaml").write_text(f"data:\n  shards: {tmp_path}\n{loss}\n{extra}")
        (run / "results.json").write_text(json.dumps({"test": {"plain": {"top1": 0.5}}}))
        weights = {"weight": optima[wd].weight.detach() + shift}
        if bias:
            weights["bias"] = optima[wd].bias.detach()
        save_file(weights, run / "final" / "model.safetensors")
        runs[name] = str(run)
    solves = [
        "--losses",
        "ce",
        "balanced_softmax",
        "logit_adjusted",
        "--weight-decay",
        "5e-4",
        "50",
    ]
    assert convex.main(["--features", str(cache), "--raw", *solves, "--run", *runs.values()]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    solved = {loss: by_wd["0.0005"] for loss, by_wd in out["lbfgs"].items()}
    assert set(solved) == {"ce", "balanced_softmax", "logit_adjusted"}
    assert 0 < solved["ce"]["top1"] <= 1
    # The prior correction moves accuracy from the head class to the rarest.
    assert solved["balanced_softmax"]["few"] > solved["ce"]["few"]
    # A weight decay that flattens the classifier loses on val: the light one is chosen.
    heavy_solve = out["lbfgs"]["balanced_softmax"]["50"]
    assert heavy_solve["val_top1"] < solved["balanced_softmax"]["val_top1"]
    assert set(out["chosen_on_val"].values()) == {"0.0005"}
    got = {name: out["runs"][run] for name, run in runs.items()}
    at, short, heavy = got["at_optimum"], got["short"], got["heavy"]
    assert at["minus_lbfgs"] == pytest.approx(0.5 - solved["balanced_softmax"]["top1"])
    assert abs(at["objective_excess"]) < 1e-6 and at["final_minus_lbfgs"] == pytest.approx(0)
    assert short["objective_excess"] > 1e-3
    # Scored against the optimum at the run's own weight decay, not the first one solved.
    assert heavy["weight_decay"] == 50 and abs(heavy["objective_excess"]) < 1e-6
    assert heavy["minus_lbfgs"] == pytest.approx(0.5 - heavy_solve["top1"])
    assert "stage2.standardize=True" in got["standardized"]["not_comparable"]
    assert "loss.tau=0.5" in got["tau"]["not_comparable"]
    assert "minus_lbfgs" not in got["tau"] and "objective" not in got["standardized"]
    assert "minus_lbfgs" in got["cosine"] and "objective" not in got["cosine"]
    with pytest.raises(SystemExit):
        convex.main(["--features", str(tmp_path)])
    assert "no train_view0.features.npy" in capsys.readouterr().err
