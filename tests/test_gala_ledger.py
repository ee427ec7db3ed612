"""``loss.ledger: sum_of_sums``: the authors' running sum of running sums, as per-class vectors."""

import math

import pytest
import torch
import torch.nn.functional as F

from gala_scale.losses import GALALoss, create_loss

K, B, STEPS = 5, 7, 6
EPS = 1e-3


def steps_of(kind: str, seed: int = 0, steps: int = STEPS):
    """(logits, target) a step; soft targets are rows of a probability matrix."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(B, K, generator=gen, dtype=torch.float64) * 2
        labels = torch.randint(0, K, (B,), generator=gen)
        if kind == "soft":
            out.append((logits, torch.softmax(3 * torch.randn(B, K, generator=gen), dim=1)))
        else:
            out.append((logits, labels))
    return out


def authors_loop(variant: str, steps, lambda1: float = 1.2, lambda2: float = 0.9):
    """The authors' bookkeeping, sample by sample in float64: a (K, K) matrix ``grad[j][k]`` of
    |dL/dz_j| from samples of class k, never reset, added whole to a positive (diagonal) and a
    negative (off-diagonal) matrix after every step; the logits take the positive matrix's
    diagonal and the negative matrix's column sums. Soft targets split a sample over its
    classes by their weights. Returns each step's mean loss and the final S vectors."""
    grad = [[0.0] * K for _ in range(K)]
    pos = [[0.0] * K for _ in range(K)]
    neg = [[0.0] * K for _ in range(K)]
    losses = []
    for logits, target in steps:
        s_pos = [pos[j][j] for j in range(K)]
        s_neg = [sum(neg[j][k] for j in range(K) if j != k) for k in range(K)]
        total = 0.0
        for i, row in enumerate(logits.tolist()):
            w = target[i].tolist() if target.is_floating_point() else [0.0] * K
            if not target.is_floating_point():
                w[int(target[i])] = 1.0
            row_term = sum(w[k] * lambda2 * math.log(s_neg[k] + EPS) for k in range(K))
            z = []
            for j in range(K):
                offset = lambda1 * math.log(s_pos[j] + EPS) - row_term
                z.append(row[j] + (offset if variant == "reference" else (1 - w[j]) * offset))
            top = max(z)
            log_norm = top + math.log(sum(math.exp(v - top) for v in z))
            total -= sum(w[j] * (z[j] - log_norm) for j in range(K))
            for j in range(K):
                g = abs(math.exp(z[j] - log_norm) - w[j])
                for k in range(K):
                    grad[j][k] += w[k] * g
        for j in range(K):
            for k in range(K):
                (pos if j == k else neg)[j][k] += grad[j][k]
        losses.append(total / len(logits))
    s_pos = [pos[j][j] for j in range(K)]
    s_neg = [sum(neg[j][k] for j in range(K) if j != k) for k in range(K)]
    as64 = {"dtype": torch.float64}
    return losses, torch.tensor(s_pos, **as64), torch.tensor(s_neg, **as64)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_sum_of_sums_equals_the_authors_nested_accumulation(variant, kind):
    steps = steps_of(kind)
    losses, s_pos, s_neg = authors_loop(variant, steps)
    loss = GALALoss(K, variant=variant, ledger="sum_of_sums").train()
    got = [loss(logits, target).item() for logits, target in steps]
    assert got == pytest.approx(losses, rel=1e-5)
    torch.testing.assert_close(loss.ledger.logit_theta, s_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.ledger.logit_phi, s_neg, rtol=1e-5, atol=1e-6)
    # The plain sum is another loss on the same batches.
    single = GALALoss(K, variant=variant).train()
    assert [single(logits, target).item() for logits, target in steps] != pytest.approx(losses)
    assert (s_pos > loss.theta * 1.5).all()  # early increments counted once a step since


def test_sum_of_sums_weighs_an_increment_by_the_steps_left():
    """S_T = sum_t (T - t + 1) * increment_t, with the loss's own increments."""
    loss = GALALoss(K, ledger="sum_of_sums").train()
    increments = []
    for logits, labels in steps_of("hard"):
        before = loss.theta.clone()
        loss(logits, labels)
        increments.append(loss.theta - before)
    weighted = sum((STEPS - t) * inc for t, inc in enumerate(increments))
    torch.testing.assert_close(loss.ledger.logit_theta, weighted, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        loss.ledger.logit_phi, loss.ledger.logit_theta
    )  # hard labels: theta = phi


def emulate_ranks(ledger: str, sync_every: int, lambdas: float, world: int = 2):
    """``world`` losses, one a rank, synced every ``sync_every`` steps the way :meth:`sync`
    does (each folds every rank's delta), and one loss on the ranks' batches concatenated."""
    rank_steps = [steps_of("hard", seed=10 + r) for r in range(world)]
    ranks = [GALALoss(K, lambdas, lambdas, ledger=ledger).train() for _ in range(world)]
    single = GALALoss(K, lambdas, lambdas, ledger=ledger).train()
    for step in range(STEPS):
        for loss, batches in zip(ranks, rank_steps, strict=True):
            loss(*batches[step])
        single(*(torch.cat(parts) for parts in zip(*(b[step] for b in rank_steps), strict=True)))
        if (step + 1) % sync_every == 0 or step + 1 == STEPS:
            deltas = [loss.ledger.delta_state() for loss in ranks]
            for loss in ranks:
                loss.ledger.fold_deltas(deltas)
    return ranks, single


@pytest.mark.parametrize(("sync_every", "lambdas"), [(1, 1.0), (4, 0.0)])
def test_rank_deltas_folded_at_syncs_equal_one_process_over_the_union(sync_every, lambdas):
    """Synced every step the ranks' logits are the single process's; synced every 4 steps (with
    the lambdas at 0 so the increments do not depend on the ledger) S still comes out equal:
    the sync adds n * theta_global for the n steps since the last one."""
    ranks, single = emulate_ranks("sum_of_sums", sync_every, lambdas)
    for loss in ranks:
        torch.testing.assert_close(
            loss.ledger.logit_theta, single.ledger.logit_theta, rtol=1e-12, atol=1e-9
        )
        torch.testing.assert_close(
            loss.ledger.logit_phi, single.ledger.logit_phi, rtol=1e-12, atol=1e-9
        )
        torch.testing.assert_close(loss.theta, single.theta, rtol=1e-12, atol=1e-9)
        assert float(loss.ledger.steps_since_sync) == 0
    # Folding the deltas alone (no n * theta_global) would fall short.
    assert (single.ledger.logit_theta > ranks[0].ledger.s_theta_global - 1).all()
    assert single.theta.sum() > 0


def test_without_the_global_term_a_rank_delta_is_not_enough():
    _, single = emulate_ranks("sum_of_sums", 4, 0.0)
    loss = GALALoss(K, 0.0, 0.0, ledger="sum_of_sums").train()
    for logits, labels in steps_of("hard", seed=10)[:4]:
        loss(logits, labels)
    # One rank's view between syncs: global S (zero here) + its own E, not the union's S.
    assert not torch.allclose(loss.ledger.logit_theta, single.ledger.logit_theta)


def test_delta_and_state_dict_resume_bit_equal():
    steps = steps_of("hard", steps=8)
    whole = GALALoss(K, ledger="sum_of_sums").train()
    for step, (logits, labels) in enumerate(steps):
        whole(logits, labels)
        if step == 2:
            whole.ledger.sync()  # where the interrupted run syncs (the sum's order is part of it)
    first = GALALoss(K, ledger="sum_of_sums").train()
    for logits, labels in steps[:3]:
        first(logits, labels)
    first.ledger.sync()
    for logits, labels in steps[3:5]:  # an unsynced delta of 2 steps, as mid-epoch
        first(logits, labels)
    resumed = GALALoss(K, ledger="sum_of_sums").train()
    resumed.load_state_dict(first.state_dict())
    resumed.ledger.load_delta(first.ledger.delta_state())
    assert float(resumed.ledger.steps_since_sync) == 2
    for logits, labels in steps[5:]:
        resumed(logits, labels)
    assert torch.equal(resumed.ledger.logit_theta, whole.ledger.logit_theta)
    assert torch.equal(resumed.ledger.logit_phi, whole.ledger.logit_phi)
    # The same delta folded as by a resume with another world size gives S too.
    folded = GALALoss(K, ledger="sum_of_sums").train()
    folded.load_state_dict(first.state_dict())
    folded.ledger.fold_deltas([first.ledger.delta_state()])
    torch.testing.assert_close(
        folded.ledger.logit_theta, first.ledger.logit_theta, rtol=1e-15, atol=0
    )


def test_mismatched_deltas_are_named():
    loss = GALALoss(K, ledger="sum_of_sums")
    with pytest.raises(ValueError, match=r"no 's_theta'.*another loss\.ledger"):
        loss.ledger.load_delta(GALALoss(K).ledger.delta_state())
    unequal = [
        loss.ledger.delta_state(),
        {**loss.ledger.delta_state(), "steps": torch.tensor([3.0])},
    ]
    with pytest.raises(ValueError, match="unequal step counts"):
        loss.ledger.fold_deltas(unequal)
    with pytest.raises(ValueError, match="unknown GALA ledger 'sums'; valid: sum, sum_of_sums"):
        GALALoss(K, ledger="sums")


def test_eval_mode_leaves_s_alone():
    loss = GALALoss(K, ledger="sum_of_sums").train()
    loss(*steps_of("hard")[0])
    s_theta = loss.ledger.logit_theta.clone()
    loss.eval()(*steps_of("hard")[1])
    assert (
        torch.equal(loss.ledger.logit_theta, s_theta) and float(loss.ledger.steps_since_sync) == 1
    )


def test_ledger_from_counts_composes_with_sum_of_sums():
    counts = [500, 200, 80, 30, 12]
    gala = GALALoss(K, ledger="sum_of_sums", ledger_init="counts", class_counts=counts)
    seed = torch.tensor(counts, dtype=torch.float64) * (1 - 1 / K)
    torch.testing.assert_close(gala.ledger.logit_theta, seed)
    logit_adjusted = create_loss("logit_adjusted", class_counts=counts, tau=1.2)
    logits, labels = steps_of("hard")[0]
    logits = logits.float()
    assert gala.train()(logits, labels).item() == pytest.approx(
        logit_adjusted(logits, labels).item(), rel=1e-5
    )
    # After the step S = seed + theta_1 = 2 * seed + increment.
    torch.testing.assert_close(gala.ledger.logit_theta, seed + gala.theta)
    assert F.cross_entropy(logits, labels).item() != pytest.approx(gala(logits, labels).item())
