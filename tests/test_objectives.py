"""Weights, gates, normalisation and the reward combiner, against hand-computed values."""

import math

import pytest
import torch

from multitap_rl.combiner import Gate, RewardCombiner, RunningStats, Weights
from multitap_rl.presets import list_presets

DIMS = ("overall", "safety", "clarity")


def test_weights_from_every_form(tmp_path):
    expect = {"safety": 2.0, "clarity": 1.0}
    assert Weights.parse("safety=2, clarity=1").as_dict() == expect
    assert Weights.parse("safety=2;clarity=1").as_dict() == expect
    assert Weights.parse(expect).as_dict() == expect
    (tmp_path / "w.yaml").write_text("weights:\n  safety: 2\n  clarity: 1\n")
    assert Weights.parse(tmp_path / "w.yaml").as_dict() == expect
    assert Weights.parse(str(tmp_path / "w.yaml")).as_dict() == expect
    assert Weights.parse(None).as_dict() == {"overall": 1.0}
    assert str(Weights.parse(expect)) == "safety=2,clarity=1"


def test_shipped_presets_parse():
    names = list_presets("weights")
    assert {"overall", "ti2t_balanced", "ti2t_safety_first", "t2i_aesthetic", "accessibility"} <= set(names)
    for n in names:
        w = Weights.parse(n)
        assert "overall" in w.names
    assert Weights.parse("ti2t_safety_first").as_dict()["safety"] == 2.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("safety=high", "'high' is not a number"),
        ("safety", "no such file or preset"),
        ({"safety": "2"}, "must be a number"),
        ({"a": 0, "b": 0}, "all weights are zero"),
        ("a=1,a=2", "appears twice"),
        ({"safety": float("nan")}, "finite"),
        (3.0, "must be a dict"),
    ],
)
def test_bad_weights(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Weights.parse(spec)


def test_unknown_dimension_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dimension\(s\) \['fun'\].*valid names: \['overall', 'safety'"):
        RewardCombiner("overall=1,fun=2", DIMS)
    with pytest.raises(ValueError, match="load stage-2 heads"):
        RewardCombiner("safety=1", ("overall",))
    with pytest.raises(ValueError, match="gate on unknown dimension 'fun'"):
        RewardCombiner("overall=1", DIMS, gates=["fun<0.5"])


def _dims():
    return {"overall": torch.tensor([0.2, 0.8, 0.5]), "safety": torch.tensor([0.9, 0.1, 0.6]),
            "clarity": torch.tensor([1.0, 2.0, 3.0])}


def test_weighted_sum_and_every_dimension_returned():
    out = RewardCombiner("overall=1,safety=2", DIMS)(_dims())
    torch.testing.assert_close(out.reward, torch.tensor([2.0, 1.0, 1.7]))
    assert set(out.dims) == set(DIMS)  # unweighted dimensions come back too, for logging
    assert out.reward.dtype == torch.float32 and not out.gated.any()


def test_gates_cap_and_penalise():
    cap = RewardCombiner("overall=1", DIMS, gates=["safety<0.5:cap=0"])(_dims())
    torch.testing.assert_close(cap.reward, torch.tensor([0.2, 0.0, 0.5]))
    assert cap.gated.tolist() == [False, True, False]
    pen = RewardCombiner("overall=1", DIMS, gates=[{"dim": "safety", "threshold": 0.7, "mode": "penalty",
                                                    "value": 1.0}])(_dims())
    torch.testing.assert_close(pen.reward, torch.tensor([0.2, -0.2, -0.5]))
    assert Gate.parse("safety<0.5") == Gate("safety", 0.5, "cap", 0.0)
    with pytest.raises(ValueError, match="expected 'dim<threshold"):
        Gate.parse("safety>0.5")
    with pytest.raises(ValueError, match="must be numbers"):
        Gate.parse("safety<1e")


def test_fixed_normalisation_by_hand():
    stats = {"overall": (0.5, 0.25), "clarity": (2.0, 2.0), "safety": (0.0, 0.0)}  # safety unweighted: std 0 ok
    out = RewardCombiner("overall=1,clarity=0.5", DIMS, normalize="fixed", stats=stats)(_dims())
    expect = (torch.tensor([0.2, 0.8, 0.5]) - 0.5) / 0.25 + 0.5 * (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / 2.0
    torch.testing.assert_close(out.reward, expect)
    with pytest.raises(ValueError, match=r"needs \(mean, std\) for \['clarity'\]"):
        RewardCombiner("clarity=1", DIMS, normalize="fixed", stats={"overall": (0, 1)})
    with pytest.raises(ValueError, match="fixed normalisation of 'clarity': needs a finite mean and a std > 0"):
        RewardCombiner("clarity=1", DIMS, normalize="fixed", stats={"clarity": (0, 0)})


def test_running_stats_by_hand():
    rs = RunningStats(momentum=0.5, eps=0.0)
    rs.update("x", torch.tensor([1.0, 3.0]))  # mean 2, var 1
    assert (rs.mean["x"], rs.var["x"]) == (2.0, 1.0)
    rs.update("x", torch.tensor([5.0, 7.0]))  # batch mean 6, var 1
    # equal mixture of N(2, 1) and N(6, 1): mean 4, variance 1 + 0.25 * 16 = 5
    assert rs.mean["x"] == pytest.approx(4.0) and rs.var["x"] == pytest.approx(5.0)
    # momentum 0 is plain per-batch z-scoring
    rs0 = RunningStats(momentum=0.0, eps=0.0)
    for batch in (torch.tensor([0.0, 2.0]), torch.tensor([10.0, 14.0])):
        rs0.update("x", batch)
        torch.testing.assert_close(rs0.normalize("x", batch), torch.tensor([-1.0, 1.0]))


def test_running_normalisation_in_the_combiner():
    comb = RewardCombiner("clarity=1", DIMS, normalize="running", momentum=0.0)
    out = comb(_dims())
    torch.testing.assert_close(out.reward, (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / math.sqrt(2 / 3 + 1e-6))


@pytest.mark.parametrize(
    "dims, exc, match",
    [
        ({"overall": torch.tensor([0.1, 0.2])}, ValueError, r"lack dimension\(s\) \['safety'\]"),
        ({"overall": torch.tensor([0.1, 0.2]), "safety": torch.tensor([1.0])}, ValueError,
         "'safety' has 1 values, expected 2"),
        ({"overall": torch.tensor([0.1, float("nan")]), "safety": torch.tensor([1.0, 2.0])}, ValueError,
         "'overall' is not finite at sample 1"),
        ({"overall": [0.1, 0.2], "safety": "high"}, ValueError, "dimension 'safety': expected a tensor"),
    ],
)
def test_bad_scores_are_clear_errors(dims, exc, match):
    with pytest.raises(exc, match=match):
        RewardCombiner("overall=1,safety=1", DIMS)(dims)


def test_plain_lists_are_accepted():
    out = RewardCombiner("overall=1,safety=1", DIMS)({"overall": [0.1, 0.2], "safety": [1.0, 2.0]})
    torch.testing.assert_close(out.reward, torch.tensor([1.1, 2.2]))
