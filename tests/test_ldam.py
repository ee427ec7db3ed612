"""LDAM and LDAM-DRW against a per-sample reference written here, DRW's switch epoch, and their
registration."""

import math

import pytest
import torch
from loss_checks import assert_gradients_flow, cosine_batch

from gala_scale import losses
from gala_scale.config import ConfigError, load_config
from gala_scale.losses import create_loss

COUNTS = [500, 120, 30, 8, 2]


def margins(counts, max_margin):
    """count^(-1/4), scaled so that the largest is max_margin."""
    raw = [n**-0.25 for n in counts]
    return [max_margin * v / max(raw) for v in raw]


def class_weights(counts, beta):
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [len(counts) * v / sum(raw) for v in raw]


def hard_loss(row, k, margin, scale):
    """-log softmax(scale * (row - margin on logit k))_k."""
    x = [scale * (z - margin) if j == k else scale * z for j, z in enumerate(row)]
    top = max(x)
    return top + math.log(sum(math.exp(v - top) for v in x)) - x[k]


def reference(logits, targets, counts, max_margin=0.5, scale=30.0, beta=None):
    """sum_i sum_k t_ik w_k l_ik / sum_i sum_k t_ik w_k, a Python loop; w = 1 without DRW
    (beta None), where the soft form is the mean over rows of sum_k t_ik l_ik."""
    m = margins(counts, max_margin)
    w = class_weights(counts, beta) if beta is not None else [1.0] * len(counts)
    total = weight = 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        probs = target if isinstance(target, list) else [k == target for k in range(len(row))]
        for k, t in enumerate(probs):
            total += t * w[k] * hard_loss(row, k, m[k], scale)
            weight += t * w[k]
    return total / (weight if beta is not None else len(logits))


def batch(seed=0, rows=12):
    return cosine_batch(len(COUNTS), seed, rows)


@pytest.mark.parametrize(("max_margin", "scale"), [(0.5, 30.0), (0.3, 16.0), (0.0, 1.0)])
def test_ldam_matches_a_per_sample_reference(max_margin, scale):
    logits, hard, soft = batch()
    loss = create_loss("ldam", class_counts=COUNTS, max_margin=max_margin, scale=scale)
    for targets in (hard, soft):
        want = reference(logits, targets, COUNTS, max_margin, scale)
        assert loss(logits, targets).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("beta", [0.9, 0.9999])
def test_ldam_drw_matches_the_reference_before_and_after_the_switch(beta):
    logits, hard, soft = batch(1)
    loss = create_loss("ldam_drw", class_counts=COUNTS, beta=beta)
    loss.start_epoch(0, 10)
    for targets in (hard, soft):
        assert loss(logits, targets).item() == pytest.approx(
            reference(logits, targets, COUNTS), rel=1e-5
        )
    loss.start_epoch(8, 10)
    for targets in (hard, soft):
        assert loss(logits, targets).item() == pytest.approx(
            reference(logits, targets, COUNTS, beta=beta), rel=1e-5
        )


def test_drw_switches_on_at_the_authors_epoch_and_after_a_resume():
    loss = create_loss("ldam_drw", class_counts=COUNTS)
    on = []
    for epoch in range(200):
        loss.start_epoch(epoch, 200)
        on.append(loss.drw)
    assert on.index(True) == 160 and all(on[160:])  # the authors' epoch // 160
    resumed = create_loss("ldam_drw", class_counts=COUNTS)
    resumed.start_epoch(170, 200)
    assert resumed.drw
    short = create_loss("ldam_drw", class_counts=COUNTS, drw_start=0.7)
    short.start_epoch(6, 10)
    assert not short.drw
    short.start_epoch(7, 10)  # 0.7 x 10 is 7, whatever float rounding says
    assert short.drw
    always = create_loss("ldam_drw", class_counts=COUNTS, drw_start=0.0)
    always.start_epoch(0, 5)
    assert always.drw
    never = create_loss("ldam", class_counts=COUNTS)
    never.start_epoch(4, 5)
    assert not never.drw


def test_drw_uses_torch_weighted_mean():
    """The authors' F.cross_entropy(weight=w): sum w_y l / sum w_y, so one class's batch is
    unweighted."""
    logits, _, _ = batch(2, rows=6)
    labels = torch.full((6,), 4)
    drw = create_loss("ldam_drw", class_counts=COUNTS)
    drw.start_epoch(9, 10)
    plain = create_loss("ldam", class_counts=COUNTS)
    assert drw(logits, labels).item() == pytest.approx(plain(logits, labels).item())


def test_soft_one_hot_targets_equal_hard_ones_even_for_confident_rows():
    """float32, p_target = 1 - 4e-9 before the margin (1.0 in float32), yet the margin of 0.5
    (x 30) brings the loss up to about 0.05: the soft path must not round it away."""
    logits = torch.tensor([[-0.15] * 4 + [0.5], [1.0] + [-0.2] * 4, [0.1, 0.3, -0.2, 0.0, 0.2]])
    labels = torch.tensor([4, 0, 2])
    one_hot = torch.nn.functional.one_hot(labels, len(COUNTS)).float()
    loss = create_loss("ldam_drw", class_counts=COUNTS)
    for epoch in (0, 9):
        loss.start_epoch(epoch, 10)
        hard, soft = loss(logits, labels), loss(logits, one_hot)
        assert soft.item() == pytest.approx(hard.item(), rel=1e-5)
        want = reference(logits.double(), labels, COUNTS, beta=0.9999 if epoch else None)
        assert soft.item() == pytest.approx(want, rel=1e-5)
    first = create_loss("ldam", class_counts=COUNTS)(logits[:1], one_hot[:1])
    assert first.item() == pytest.approx(reference(logits[:1].double(), labels[:1], COUNTS))
    assert 0.04 < first.item() < 0.06


def test_margins_follow_the_count_to_the_minus_quarter():
    loss = create_loss("ldam", class_counts=[10000, 1], max_margin=0.5)
    assert loss.margins.tolist() == pytest.approx([0.05, 0.5])


def test_gradients_flow_for_hard_and_soft_targets():
    logits, hard, soft = batch(3)
    loss = create_loss("ldam_drw", class_counts=COUNTS)
    for epoch in (0, 9):
        loss.start_epoch(epoch, 10)
        assert_gradients_flow(loss, logits, hard, soft.float())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_counts": [3, 0, 1]}, "class_counts must be positive"),
        ({"class_counts": [3, 1], "max_margin": -0.1}, "max_margin must be"),
        ({"class_counts": [3, 1], "scale": 0.0}, "scale must be"),
        ({"class_counts": [3, 1], "drw_start": 1.0}, r"drw_start must be in \[0, 1\)"),
        ({"class_counts": [3, 1], "beta": 1.0}, "beta must be in"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_loss("ldam_drw", **kwargs)


def test_bad_epochs_and_shapes_raise():
    loss = create_loss("ldam_drw", class_counts=COUNTS)
    with pytest.raises(ValueError, match="epoch must be in"):
        loss.start_epoch(5, 5)
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, 5\)"):
        loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_ldam_drw_is_a_config_choice_with_its_options_and_bounds():
    overrides = ["data.shards=x", "loss.name=ldam_drw", "loss.drw_start=0.5"]
    overrides += ["loss.max_margin=0.3", "loss.scale=16", "loss.beta=0.999"]
    cfg = load_config(overrides=overrides)
    built = losses.build_loss(cfg.loss, len(COUNTS), COUNTS)
    assert (built.drw_start, built.max_margin, built.scale, built.beta) == (0.5, 0.3, 16.0, 0.999)
    built.start_epoch(5, 10)
    assert built.drw
    cfg = load_config(overrides=["data.shards=x", "loss.name=ldam"])
    assert losses.build_loss(cfg.loss, len(COUNTS), COUNTS).drw_start is None
    for override, message in [
        ("loss.drw_start=1", r"loss\.drw_start: must be < 1, got 1"),
        ("loss.scale=0", r"loss\.scale: must be > 0, got 0"),
        ("loss.max_margin=-1", r"loss\.max_margin: must be >= 0, got -1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=["data.shards=x", "loss.name=ldam_drw", override])
