"""Metrics: hand-computed values, scipy, and the reference's pairwise-accuracy tie rules."""

import math

import numpy as np
import pytest
import torch

from multitap_rl.metrics import (
    dimension_report,
    format_report,
    kendall_tau,
    mse,
    pairwise_accuracy,
    preference_accuracy,
    r2_score,
    tolerance_accuracy,
)


def test_kendall_by_hand_with_ties():
    # pairs: C = 4, D = 0; one pair tied in x, one tied in y; 3 distinct values each
    x, y = [1, 1, 2, 3], [1, 2, 2, 3]
    assert kendall_tau(x, y, "b") == pytest.approx(4 / math.sqrt(5 * 5))
    assert kendall_tau(x, y, "c") == pytest.approx(2 * 4 / (16 * (2 / 3)))
    # one swap in five: C = 8, D = 2
    assert kendall_tau([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], "b") == pytest.approx(0.6)
    assert kendall_tau([1, 2, 3], [3, 2, 1], "b") == pytest.approx(-1.0)


@pytest.mark.parametrize("n, levels", [(7, 3), (50, 5), (300, 4), (2500, 10)])
@pytest.mark.parametrize("variant", ["b", "c"])
def test_kendall_matches_scipy(n, levels, variant):
    from scipy.stats import kendalltau

    rng = np.random.default_rng(n + levels)
    target = rng.integers(0, levels, size=n).astype(float)  # human scores: many ties
    pred = np.round(target + rng.normal(0, 1.5, size=n), 1)  # predictions: some ties
    ours = kendall_tau(pred, target, variant)
    ref = kendalltau(pred, target, variant=variant).statistic
    assert ours == pytest.approx(ref, abs=1e-12)


def test_kendall_constant_input_is_nan_and_accepts_tensors():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3], "b"))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3], "c"))
    t = torch.tensor([0.1, 0.4, 0.3])
    assert kendall_tau(t, [1, 3, 2]) == pytest.approx(1.0)


def _cal_acc_loop(pred, target, groups):
    """The reference's cal_acc rules written out: human ties skipped, prediction ties wrong."""
    correct = total = 0
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if target[i] == target[j]:
                    continue
                total += 1
                if (target[i] > target[j] and pred[i] > pred[j]) or (target[i] < target[j] and pred[i] < pred[j]):
                    correct += 1
    return correct / total


def test_pairwise_accuracy_by_hand():
    pred, target = [0.1, 0.5, 0.5, 0.9], [1, 2, 3, 3]
    # ordered pairs: (0,1) (0,2) (0,3) (1,2) (1,3); (2,3) is a human tie; (1,2) a prediction tie -> wrong
    assert pairwise_accuracy(pred, target) == pytest.approx(4 / 5)
    # ranks (1 = best) reverse the order
    assert pairwise_accuracy([3.0, 2.0, 1.0], [1, 2, 3], lower_is_better=True) == pytest.approx(1.0)
    assert pairwise_accuracy([3.0, 2.0, 1.0], [1, 2, 3]) == pytest.approx(0.0)
    assert math.isnan(pairwise_accuracy([1.0, 2.0], [5, 5]))


def test_pairwise_accuracy_matches_cal_acc_rules_with_groups():
    rng = np.random.default_rng(0)
    n = 120
    groups = rng.integers(0, 15, size=n).tolist()
    target = rng.integers(0, 4, size=n).astype(float)
    pred = np.round(rng.normal(size=n), 1)
    assert pairwise_accuracy(pred, target, groups) == pytest.approx(_cal_acc_loop(pred, target, groups))
    assert pairwise_accuracy(pred, target) == pytest.approx(_cal_acc_loop(pred, target, [0] * n))


def test_simple_metrics_by_hand():
    assert tolerance_accuracy([0, 0.5, 1.2], [0, 1, 0]) == pytest.approx(2 / 3)
    assert tolerance_accuracy([0, 0.5, 1.2], [0, 1, 0], tol=0.49) == pytest.approx(1 / 3)
    assert mse([1, 2, 3], [1, 1, 1]) == pytest.approx(5 / 3)
    assert r2_score([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert r2_score([2, 2, 2], [1, 2, 3]) == pytest.approx(0.0)
    assert preference_accuracy([0.9, 0.5, 0.3], [0.1, 0.5, 0.4]) == pytest.approx(1 / 3)  # tie counts wrong


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mse([1, 2], [1, 2, 3]), "pred has 2 values but target has 3"),
        (lambda: kendall_tau([1, float("nan")], [1, 2]), "pred is not finite at index 1"),
        (lambda: kendall_tau([1, 2], [1, 2], "a"), "variant"),
        (lambda: pairwise_accuracy([1, 2], [1, 2], groups=[0]), "one label per sample"),
        (lambda: tolerance_accuracy([1], [1], tol=-1), "tol"),
        (lambda: mse([], []), "empty"),
        (lambda: preference_accuracy([1, 2], [1]), "chosen has 2 values but rejected has 1"),
    ],
)
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dimension_report_skips_unrated_and_formats():
    pred = {"a": [0.0, 1.0, 2.0, 3.0], "b": [1.0, 1.0, 0.0, 0.0], "extra": [0, 0, 0, 0]}
    target = {"a": [0.0, 1.0, float("nan"), 2.0], "b": [1.0, 1.0, 0.0, 1.0]}
    rep = dimension_report(pred, target)
    assert list(rep) == ["a", "b"]
    assert rep["a"]["n"] == 3 and rep["a"]["mse"] == pytest.approx(1 / 3)
    assert rep["b"]["acc@0.5"] == pytest.approx(3 / 4)
    table = format_report(rep)
    assert table.splitlines()[0].split()[:3] == ["dimension", "n", "mse"]
    assert "mean" in table.splitlines()[-1]
    with pytest.raises(ValueError, match="no dimension in common"):
        dimension_report({"x": [1]}, {"y": [1]})
    with pytest.raises(ValueError, match="every target is NaN"):
        dimension_report({"x": [1, 2]}, {"x": [float("nan")] * 2})
