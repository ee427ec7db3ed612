import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gala_scale.losses import GALALoss, create_loss, specs

K, B = 5, 7
HERE = Path(__file__).parent


def seeded_loss(variant: str, lambda1: float = 1.2, lambda2: float = 0.9) -> GALALoss:
    loss = GALALoss(K, lambda1=lambda1, lambda2=lambda2, variant=variant)
    gen = torch.Generator().manual_seed(0)
    loss.ledger.theta_global.copy_(torch.rand(K, generator=gen, dtype=torch.float64) * 50)
    loss.ledger.phi_global.copy_(torch.rand(K, generator=gen, dtype=torch.float64) * 50)
    loss.ledger.theta_delta.copy_(torch.rand(K, generator=gen, dtype=torch.float64))
    return loss


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, generator=gen), torch.randint(0, K, (B,), generator=gen)


def eq6_by_hand(loss: GALALoss, logits: torch.Tensor, labels: torch.Tensor):
    """Adjusted logits, mean loss and dL/dz written element by element in float64."""
    theta, phi, eps = loss.theta.tolist(), loss.phi.tolist(), loss.eps
    total, grads, adjusted = 0.0, [], []
    for row, k in zip(logits.double().tolist(), labels.tolist(), strict=True):
        z = []
        for j, z_j in enumerate(row):
            shift = loss.lambda1 * math.log(theta[j] + eps) - loss.lambda2 * math.log(phi[k] + eps)
            z.append(z_j if (j == k and loss.variant == "paper") else z_j + shift)
        top = max(z)
        log_norm = top + math.log(sum(math.exp(v - top) for v in z))
        total += log_norm - z[k]
        grads.append([(math.exp(v - log_norm) - (j == k)) / len(labels) for j, v in enumerate(z)])
        adjusted.append(z)
    as64 = {"dtype": torch.float64}
    return torch.tensor(adjusted, **as64), total / len(labels), torch.tensor(grads, **as64)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_loss_and_gradient_equal_eq6_by_hand(variant):
    loss = seeded_loss(variant)
    logits, labels = batch()
    # The call uses the ledger as it was before the call's own update.
    adjusted, expected, expected_grad = eq6_by_hand(loss, logits, labels)
    torch.testing.assert_close(
        loss.adjusted_logits(logits, labels).double(), adjusted, rtol=1e-5, atol=1e-5
    )
    logits.requires_grad_(True)
    value = loss(logits, labels)
    value.backward()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_loss_at_8142_classes_and_extreme_logits_equals_float64_cross_entropy(variant):
    """The hard-label loss is computed in place in one (batch, K) buffer; at iNat's K and with
    logits far past exp's float32 range it still equals cross-entropy of the adjusted logits."""
    k = 8142
    loss = GALALoss(k, variant=variant).train()
    gen = torch.Generator().manual_seed(0)
    loss.ledger.theta_global.copy_(torch.rand(k, generator=gen, dtype=torch.float64) * 1e4)
    loss.ledger.phi_global.copy_(torch.rand(k, generator=gen, dtype=torch.float64) * 1e4)
    logits = (torch.randn(32, k, generator=gen) * 60).requires_grad_(True)
    labels = torch.randint(0, k, (32,), generator=gen)
    reference = logits.detach().double().requires_grad_(True)
    expected = F.cross_entropy(loss.adjusted_logits(reference, labels), labels)
    expected.backward()
    value = loss(logits, labels)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 1  # the extreme rows are wrong
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-4, atol=1e-7)


def test_fused_nll_passes_gradcheck():
    from gala_scale.losses.gala import _ShiftedNLL

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    shift, on_target = torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    labels = torch.tensor([0, 5, 2, 2])
    for extra in (None, on_target):
        assert torch.autograd.gradcheck(
            lambda z, extra=extra: _ShiftedNLL.apply(z, shift, extra, labels), (logits,)
        )


def test_variants_differ_with_published_lambdas():
    logits, labels = batch()
    paper = seeded_loss("paper")(logits, labels)
    reference = seeded_loss("reference")(logits, labels)
    assert abs(paper.item() - reference.item()) > 1e-3


def test_reference_lambda2_term_leaves_loss_unchanged():
    logits, labels = batch()
    values = [seeded_loss("reference", lambda2=lam2)(logits, labels).item() for lam2 in (0, 0.9, 5)]
    assert values == pytest.approx([values[0]] * 3, rel=1e-6)
    paper = [seeded_loss("paper", lambda2=lam2)(logits, labels).item() for lam2 in (0, 0.9)]
    assert paper[0] != pytest.approx(paper[1], rel=1e-4)


def test_variants_coincide_when_lambdas_equal_and_ledger_from_hard_labels():
    paper, reference = GALALoss(K, 1.0, 1.0, variant="paper"), GALALoss(K, 1.0, 1.0)
    for seed in range(5):
        logits, labels = batch(seed)
        assert paper(logits, labels).item() == pytest.approx(reference(logits, labels).item())
    torch.testing.assert_close(paper.theta, reference.theta)


def autograd_split(adjusted: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per class, the summed |dL_i/dz'| on the target column and off it, by autograd in float64."""
    z = adjusted.double().detach().requires_grad_(True)
    F.cross_entropy(z, labels, reduction="sum").backward()  # row i's gradient is dL_i/dz'_i
    grad_abs = z.grad.abs()
    on_target = F.one_hot(labels, z.shape[1]).bool()
    pos = torch.zeros(z.shape[1], dtype=torch.float64).index_add_(0, labels, grad_abs[on_target])
    neg = torch.zeros_like(pos).index_add_(0, labels, (grad_abs * ~on_target).sum(1))
    return pos, neg


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("seed", range(3))
def test_hard_label_increments_equal_the_autograd_gradient_magnitudes(variant, seed):
    loss = seeded_loss(variant)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, K, generator=gen) * 4  # confident and wrong rows as well
    labels = torch.randint(0, K, (64,), generator=gen)
    adjusted = loss.adjusted_logits(logits, labels)
    theta0, phi0 = loss.theta.clone(), loss.phi.clone()
    loss(logits, labels)
    pos, neg = autograd_split(adjusted, labels)
    torch.testing.assert_close(loss.theta - theta0, pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.phi - phi0, neg, rtol=1e-5, atol=1e-6)
    assert pos.min() > 0  # every class is a target somewhere in 64 rows: the check is not vacuous


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_soft_targets_split_contributions_by_target_weight(variant):
    loss = seeded_loss(variant)
    logits, labels = batch()
    targets = F.one_hot(labels, K).double() * 0.8 + 0.2 / K  # label smoothing 0.2
    adjusted = loss.adjusted_logits(logits, targets.float())
    theta0, phi0 = loss.theta.clone(), loss.phi.clone()
    loss(logits, targets)
    grad_abs = (F.softmax(adjusted.double(), dim=1) - targets).abs()
    pos, neg = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for i in range(B):
        for k in range(K):
            pos[k] += targets[i, k] * grad_abs[i, k]
            neg[k] += targets[i, k] * (grad_abs[i].sum() - grad_abs[i, k])
    torch.testing.assert_close(loss.theta - theta0, pos, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.phi - phi0, neg, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(pos, neg)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_one_hot_soft_targets_equal_hard_targets(variant):
    hard, soft = seeded_loss(variant), seeded_loss(variant)
    logits, labels = batch()
    value_hard = hard(logits, labels)
    value_soft = soft(logits, F.one_hot(labels, K).float())
    assert value_soft.item() == pytest.approx(value_hard.item(), rel=1e-6)
    torch.testing.assert_close(soft.theta, hard.theta)
    torch.testing.assert_close(soft.phi, hard.phi)


def test_eval_mode_leaves_the_ledger_alone():
    loss = seeded_loss("reference").eval()
    theta, phi = loss.theta.clone(), loss.phi.clone()
    loss(*batch())
    assert torch.equal(loss.theta, theta) and torch.equal(loss.phi, phi)


def test_ledger_is_float64_and_round_trips_through_state_dict():
    loss = seeded_loss("paper")
    loss(*batch())
    restored = GALALoss(K, variant="paper")
    restored.load_state_dict(loss.state_dict())
    assert restored.theta.dtype == torch.float64
    assert torch.equal(restored.theta, loss.theta) and torch.equal(restored.phi, loss.phi)
    logits, labels = batch(3)
    assert restored(logits, labels).item() == loss(logits, labels).item()


def test_sync_without_process_group_folds_delta_and_keeps_ledger():
    loss = seeded_loss("reference")
    loss(*batch())
    theta, phi = loss.theta.clone(), loss.phi.clone()
    loss.ledger.sync()
    assert torch.equal(loss.ledger.theta_delta, torch.zeros(K, dtype=torch.float64))
    torch.testing.assert_close(loss.ledger.theta_global, theta)
    torch.testing.assert_close(loss.phi, phi)


def test_non_finite_logits_raise_and_do_not_touch_the_ledger():
    loss = seeded_loss("reference")
    theta = loss.theta.clone()
    logits, labels = batch()
    logits[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        loss(logits, labels)
    assert torch.equal(loss.theta, theta)


@pytest.mark.parametrize(
    ("logits", "targets", "match"),
    [
        (torch.zeros(3, K + 1), torch.zeros(3, dtype=torch.long), "shape"),
        (torch.zeros(3, K), torch.zeros(4, dtype=torch.long), "hard targets"),
        (torch.zeros(3, K), torch.zeros(3), "hard targets"),
        (torch.zeros(3, K), torch.zeros(3, K + 1), "soft targets"),
    ],
)
def test_bad_inputs_are_named(logits, targets, match):
    with pytest.raises(ValueError, match=match):
        GALALoss(K)(logits, targets)


def test_bad_arguments_and_registry():
    with pytest.raises(ValueError, match="valid: reference, paper"):
        GALALoss(K, variant="eq6")
    with pytest.raises(ValueError, match="num_classes"):
        GALALoss(1)
    with pytest.raises(ValueError, match=r"unknown loss 'no_such_loss'; valid: ") as err:
        create_loss("no_such_loss")
    assert all(name in str(err.value) for name in specs())
    with pytest.raises(ValueError, match="bad arguments for loss 'gala'"):
        create_loss("gala", classes=3)
    assert {"ce", "logit_adjusted", "balanced_softmax", "gala"} <= set(specs())


def test_prior_losses_add_log_prior():
    counts = [100, 30, 10, 3, 1]
    logits, labels = batch()
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts)).float()
    la = create_loss("logit_adjusted", class_counts=counts, tau=2.0)(logits, labels)
    assert la.item() == pytest.approx(F.cross_entropy(logits + 2 * log_prior, labels).item())
    bs = create_loss("balanced_softmax", class_counts=counts)(logits, labels)
    log_counts = torch.log(torch.tensor(counts, dtype=torch.float32))
    assert bs.item() == pytest.approx(F.cross_entropy(logits + log_counts, labels).item())
    assert create_loss("ce")(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item()
    )
    with pytest.raises(ValueError, match="positive"):
        create_loss("balanced_softmax", class_counts=[3, 0, 1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ledger", "sync_every", "lambdas"),
    [("sum", 1, 1.0), ("sum_of_sums", 1, 1.0), ("sum_of_sums", 2, 0.0)],
)
def test_two_process_sync_equals_one_process_over_the_union(
    tmp_path, port, ledger, sync_every, lambdas
):
    """Two gloo processes against one on the union of their batches. Synced every step the
    logits agree too; synced every 2 steps (lambdas 0, so the increments do not depend on what
    each rank saw) the sum of sums still comes out as the single process's."""
    sys.path.insert(0, str(HERE))
    from dist_worker import NUM_CLASSES, STEPS, rank_batch

    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = [ledger, str(sync_every), str(lambdas)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "dist_worker.py"), str(tmp_path / f"rank{rank}.pt"), *args],
            env={**env, "RANK": str(rank)},
        )
        for rank in range(2)
    ]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    single = GALALoss(NUM_CLASSES, lambdas, lambdas, ledger=ledger).train()
    for step in range(STEPS):
        logits, labels = zip(*(rank_batch(rank, step) for rank in range(2)), strict=True)
        single(torch.cat(logits), torch.cat(labels))
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])
    for key in ("theta", "phi", "logit_theta", "logit_phi"):
        torch.testing.assert_close(
            ranks[0][key], getattr(single.ledger, key), rtol=1e-12, atol=1e-12
        )
    assert bool((single.theta > 0).all())  # both ranks' classes received gradient


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_cuda_loss_gradient_and_ledger_equal_the_cpu(variant):
    on_cpu, on_gpu = seeded_loss(variant), seeded_loss(variant).cuda()
    logits, labels = batch()
    x_cpu, x_gpu = logits.clone().requires_grad_(True), logits.cuda().requires_grad_(True)
    value_cpu, value_gpu = on_cpu(x_cpu, labels), on_gpu(x_gpu, labels.cuda())
    value_cpu.backward()
    value_gpu.backward()
    torch.testing.assert_close(value_gpu.cpu(), value_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-6)
    assert on_gpu.theta.dtype == torch.float64 and on_gpu.theta.is_cuda
    torch.testing.assert_close(on_gpu.theta.cpu(), on_cpu.theta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(on_gpu.phi.cpu(), on_cpu.phi, rtol=1e-6, atol=1e-6)


def test_ledger_from_counts_starts_gala_as_logit_adjustment_with_tau_lambda1():
    counts = [500, 200, 80, 30, 12]
    gala = GALALoss(K, 1.2, 0.9, ledger_init="counts", class_counts=counts, ledger_init_scale=2)
    seed = torch.tensor(counts, dtype=torch.float64) * 2 * (1 - 1 / K)
    torch.testing.assert_close(gala.theta, seed)
    torch.testing.assert_close(gala.phi, seed)
    logit_adjusted = create_loss("logit_adjusted", class_counts=counts, tau=1.2)
    gala.eval()  # the ledger stays at its seed
    for seed_ in range(3):
        logits, labels = batch(seed_)
        assert gala(logits, labels).item() == pytest.approx(
            logit_adjusted(logits, labels).item(), rel=1e-5
        )
    # The run's own increments add to the seed; zeros stays the default.
    gala.train()(logits, labels)
    assert (gala.theta >= seed).all() and (gala.theta > seed).any()
    assert GALALoss(K).theta.sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ledger_init": "prior"}, "unknown ledger_init 'prior'"),
        ({"ledger_init": "counts"}, "needs 5 class counts, got none"),
        ({"ledger_init": "counts", "class_counts": [1, 2]}, "needs 5 class counts, got 2 counts"),
        ({"ledger_init": "counts", "class_counts": [1] * 5, "ledger_init_scale": 0}, "scale > 0"),
    ],
)
def test_ledger_init_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GALALoss(K, **kwargs)
