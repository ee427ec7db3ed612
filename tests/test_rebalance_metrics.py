import numpy as np
import pytest
import torch

from gala_scale import metrics, rebalance


def long_tailed_probs(n: int = 400, k: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of a model biased towards the low class indices."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels] + np.linspace(2, 0, k)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True), labels


def balanced_probs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same biased model on a test set with every class equally often."""
    probs, labels = long_tailed_probs(600, seed=seed)
    keep = np.concatenate([np.flatnonzero(labels == k)[:60] for k in range(6)])
    return probs[keep], labels[keep]


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.7])
def test_stored_and_transductive_pn_differ_off_the_calibration_set(tau):
    val, _ = long_tailed_probs(300, seed=1)  # where the scales are fitted (a deployment's val)
    test, _ = balanced_probs(seed=2)  # what is served later: another set, another class mix
    stored = rebalance.apply(test, rebalance.fit(val), tau)
    transductive = rebalance.transductive(test, tau)
    for out, mass in ((stored, val.mean(0)), (transductive, test.mean(0))):
        expected = test / mass**tau
        np.testing.assert_allclose(out, expected / expected.sum(1, keepdims=True))
    assert not np.allclose(stored, transductive, atol=1e-3)
    # On the calibration set itself the two are one formula.
    np.testing.assert_allclose(
        rebalance.apply(val, rebalance.fit(val), tau), rebalance.transductive(val, tau)
    )


def test_pn_reduces_head_bias_and_matches_closed_form():
    probs, labels = long_tailed_probs()
    scales = rebalance.fit(probs)
    np.testing.assert_allclose(scales, probs.mean(0))
    adjusted = rebalance.apply(probs, scales, 1.0)
    expected = probs / scales
    np.testing.assert_allclose(adjusted, expected / expected.sum(1, keepdims=True))
    plain_acc = metrics.per_class_accuracy(probs.argmax(1), labels, 6)
    pn_acc = metrics.per_class_accuracy(adjusted.argmax(1), labels, 6)
    assert pn_acc.mean() > plain_acc.mean()
    assert pn_acc[-1] > plain_acc[-1]  # the rarest-predicted class gains


def test_torch_in_torch_out():
    probs, _ = long_tailed_probs()
    t_probs = torch.from_numpy(probs)
    scales = rebalance.fit(t_probs)
    assert isinstance(scales, torch.Tensor)
    out = rebalance.apply(t_probs, scales, 1.5)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), rebalance.apply(probs, probs.mean(0), 1.5))
    assert isinstance(rebalance.transductive(t_probs), torch.Tensor)


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (np.array([[0.5, 0.6], [0.5, 0.5]]), "sum to 1"),
        (np.array([[1.5, -0.5]]), "negative"),
        (np.array([[np.nan, 1.0]]), "NaN"),
        (np.ones(3) / 3, "shape"),
        (np.ones((2, 1)), "shape"),
    ],
)
def test_bad_probabilities_raise(probs, match):
    with pytest.raises(ValueError, match=match):
        rebalance.fit(probs)
    with pytest.raises(ValueError, match=match):
        rebalance.transductive(probs)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_class_without_probability_mass_gets_the_smallest_mass_of_the_others(kind):
    probs, _ = long_tailed_probs()
    probs[:, 5] = 0.0  # the model never gives class 5 any probability (softmax underflow)
    probs /= probs.sum(1, keepdims=True)
    if kind == "torch":
        probs = torch.from_numpy(probs)
    with pytest.warns(RuntimeWarning, match=r"classes \[5\] have zero probability mass"):
        scales = rebalance.fit(probs)
    assert float(scales[5]) == float(scales[:5].min()) > 0
    with pytest.warns(RuntimeWarning, match="zero probability mass"):
        transductive = rebalance.transductive(probs)
    for adjusted in (rebalance.apply(probs, scales), transductive):
        assert bool((adjusted[:, 5] == 0).all()) and np.allclose(np.asarray(adjusted.sum(1)), 1)


def test_bad_scales_and_tau_raise():
    probs, _ = long_tailed_probs(k=4)
    with pytest.raises(ValueError, match="4 classes, the scales have 3"):
        rebalance.apply(probs, np.ones(3) / 3)
    with pytest.raises(ValueError, match="> 0"):
        rebalance.apply(probs, np.array([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="tau"):
        rebalance.apply(probs, np.ones(4) / 4, tau=-1)
    with pytest.raises(TypeError, match="both"):
        rebalance.apply(probs, torch.ones(4) / 4)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        rebalance.fit([[0.5, 0.5]])


def test_fit_tau_picks_rebalancing_for_biased_model_and_none_for_balanced_one():
    probs, labels = long_tailed_probs(n=2000)
    assert rebalance.fit_tau(probs, labels) > 0
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 2000)
    balanced = np.full((2000, 4), 0.1) + 0.6 * np.eye(4)[labels]
    assert rebalance.fit_tau(balanced, labels) == 0.0


def test_metrics_on_a_hand_made_case():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    preds = np.array([0, 0, 0, 1, 1, 0, 0, 0, 2, 0])
    assert metrics.top1(preds, labels) == pytest.approx(0.5)
    acc = metrics.per_class_accuracy(preds, labels, 5)
    np.testing.assert_allclose(acc[:4], [0.75, 0.5, 1 / 3, 0.0])
    assert np.isnan(acc[4])  # class 4 has no test sample
    np.testing.assert_array_equal(metrics.positive_predictions(preds, 5), [7, 2, 1, 0, 0])
    # many: classes 0, 1 (> 100), medium: 2 (20..100), few: 3, 4 (< 20; 4 not evaluated)
    groups = metrics.group_accuracy(acc, [500, 101, 20, 19, 2])
    assert groups == pytest.approx({"many": 0.625, "medium": 1 / 3, "few": 0.0})


def test_empty_group_is_absent_not_zero():
    acc = np.array([1.0, 0.5])
    assert metrics.group_accuracy(acc, [1000, 500]) == {"many": 0.75, "medium": None, "few": None}
    assert metrics.shot_group([101, 100, 20, 19]).tolist() == ["many", "medium", "medium", "few"]


def test_expected_calibration_error():
    labels = np.array([0, 1, 0, 1])
    perfect = np.eye(2)[labels]
    assert metrics.expected_calibration_error(perfect, labels) == 0.0
    # Confidence 0.9 everywhere, accuracy 0.5: ECE = 0.4.
    over = np.array([[0.9, 0.1]] * 4)
    assert metrics.expected_calibration_error(over, labels) == pytest.approx(0.4)
    # Two bins: 0.6-confident and right (gap 0.4), 0.95-confident and wrong (gap 0.95).
    probs = np.array([[0.6, 0.4], [0.05, 0.95]])
    assert metrics.expected_calibration_error(probs, np.array([0, 0])) == pytest.approx(0.675)
    bins = metrics.reliability(probs, np.array([0, 0]), n_bins=10)
    assert bins["count"] == [0] * 5 + [1, 0, 0, 0, 1]
    assert bins["accuracy"][5] == 1.0 and bins["accuracy"][9] == 0.0 and bins["accuracy"][0] is None
    assert bins["confidence"][5] == pytest.approx(0.6) and bins["confidence"][9] == 0.95


def test_summarize_reports_everything():
    probs, labels = long_tailed_probs(k=3)
    summary = metrics.summarize(torch.from_numpy(probs), labels, [1000, 50, 5])
    assert set(summary) == {
        "top1",
        "many",
        "medium",
        "few",
        "per_class",
        "positive_predictions",
        "ece",
        "reliability",
    }
    bins = summary["reliability"]
    assert sum(bins["count"]) == len(labels) and len(bins["accuracy"]) == metrics.ECE_BINS
    assert summary["many"] == pytest.approx(summary["per_class"][0])
    assert sum(summary["positive_predictions"]) == len(labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        metrics.summarize(probs, labels + 5, [1, 2, 3])


def test_the_servers_shot_accuracy_is_the_trainers():
    """gala-batch (torch-free, so it cannot import gala_scale) mirrors metrics' shot groups:
    held to them here on counts at each group's edges."""
    from gala_serve.batch import shot_accuracy

    counts = [500, 101, 100, 20, 19, 1, 7]
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(len(counts)), 13)
    preds = np.where(rng.random(labels.size) < 0.6, labels, rng.integers(0, 7, labels.size))
    served = shot_accuracy(preds, labels, counts)
    class_acc = metrics.per_class_accuracy(preds, labels, len(counts))
    assert served == pytest.approx(
        {"top1": metrics.top1(preds, labels), **metrics.group_accuracy(class_acc, counts)}
    )


def test_post_hoc_logit_adjustment_is_softmax_of_logits_minus_tau_log_prior():
    rng = np.random.default_rng(3)
    logits, counts = rng.normal(size=(7, 4)), [500, 120, 30, 5]
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    for tau in (0.0, 0.5, 1.0, 1.7):
        got = rebalance.apply(probs, rebalance.prior(counts), tau)
        for b in range(7):  # per sample, from the definition
            z = logits[b] - tau * np.log(np.asarray(counts) / sum(counts))
            np.testing.assert_allclose(got[b], np.exp(z) / np.exp(z).sum(), rtol=1e-9)
    with pytest.raises(ValueError, match="count > 0 for every class"):
        rebalance.prior([3, 0, 2])


def test_tau_normalised_classifier_divides_each_class_vector_by_its_norm_to_tau():
    rng = np.random.default_rng(4)
    features, weight = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) * [[9], [3], [1], [0.2]]
    for tau in (0.0, 0.5, 1.0):
        got = rebalance.tau_normalised(features, weight, tau)
        for b, k in np.ndindex(5, 4):
            want = sum(features[b, d] * weight[k, d] for d in range(3))
            assert got[b, k] == pytest.approx(want / np.sqrt((weight[k] ** 2).sum()) ** tau)
    as_torch = rebalance.tau_normalised(torch.from_numpy(features), torch.from_numpy(weight), 1.0)
    np.testing.assert_allclose(as_torch.numpy(), rebalance.tau_normalised(features, weight, 1.0))


def test_best_tau_maximises_class_balanced_accuracy_and_prefers_the_smallest_on_ties():
    labels = np.array([0, 0, 0, 1, 2])
    # tau 0 predicts the head for everything (1 of 3 classes right); tau >= 0.6 gets all.
    preds = {0.0: [0, 0, 0, 0, 0], 0.3: [0, 0, 0, 1, 0], 0.6: [0, 0, 0, 1, 2]}
    assert (
        rebalance.best_tau(labels, lambda t: np.array(preds[min(t, 0.6)]), (0, 0.3, 0.6, 1)) == 0.6
    )
    assert rebalance.best_tau(labels, lambda t: np.zeros(5, int), (0.5, 1.0)) == 0.5


@pytest.mark.parametrize("block", [1, 30, 2**18])  # a row a block; 5, 5, 3 rows; one block
def test_tau_searches_argmax_as_the_definitions_do_for_every_tau(block, monkeypatch):
    monkeypatch.setattr(rebalance, "ARGMAX_BLOCK", block)
    rng = np.random.default_rng(5)
    logits, scales = rng.normal(size=(13, 6)) * 3, rng.dirichlet(np.ones(6) * 0.3)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    features, weight = (
        rng.normal(size=(13, 4)),
        rng.normal(size=(6, 4)) * rng.uniform(0.1, 9, (6, 1)),
    )
    by_scales = rebalance.adjusted_argmax(probs, scales)
    by_norms = rebalance.normalised_argmax(features, weight)
    for tau in (*rebalance.TAUS, 0.37, 3.0):  # the grid, and taus off it
        want = rebalance.apply(probs, scales, tau).argmax(1)
        np.testing.assert_array_equal(by_scales(tau), want)
        want = rebalance.tau_normalised(features, weight, tau).argmax(1)
        np.testing.assert_array_equal(by_norms(tau), want)
    for search in (by_scales, by_norms):  # the taus move the argmax: not one row repeated
        assert len({tuple(search(t)) for t in rebalance.TAUS}) > 1
    with pytest.raises(ValueError, match="read-only"):
        by_scales(0.0)[0] = 1  # the table is every caller's: nobody writes into it
    assert (
        rebalance.best_tau(np.arange(13) % 6, rebalance.normalised_argmax(features, weight, ()), ())
        == 0.0
    )
