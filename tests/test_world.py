"""The captioner world (``multitap-rl demo``): its ground truth, its arguments, the report's shape,
and a short learning check (the full runs belong to the demo, not to this suite)."""

from __future__ import annotations

import json
import random

import pytest

from multitap_rl.cli import main
from multitap_rl.errors import ConfigError
from multitap_rl.world.captioner import (
    CaptionerWorldConfig,
    check_targets,
    steering_target,
)
from multitap_rl.world.shapes_world import (
    accuracy,
    balanced_scenes,
    caption_of,
    judge_target,
    make_pool,
    malform,
    names,
    well_formed,
)

POOL = make_pool(["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "cross"],
                 ["left", "top", "center"])


def test_string_matching_names_one_value_and_only_one():
    assert names("a red circle on the left", "color", "red", POOL)
    assert not names("a red circle on the left", "color", "blue", POOL)
    assert not names("a red blue circle on the left", "color", "red", POOL)  # two colours: not naming red
    assert names("a red circle at the top", "position", "top", POOL)
    assert not names("a red circle on the left at the top", "position", "top", POOL)
    assert names("A red circle.", "shape", "circle", POOL)
    assert well_formed("a red circle on the left", POOL)
    assert not well_formed("a red circle on the left left", POOL)
    assert not well_formed("a purple circle on the left", POOL)  # not in this world's pool
    assert judge_target("a red circle", "color", "red", POOL) == 0.0  # off format: right about nothing


def test_balanced_scenes_make_an_image_blind_captioner_score_chance():
    scenes = balanced_scenes(POOL, 2)
    assert len(scenes) == 2 * 4 * 4 * 3
    rng = random.Random(0)
    blind = caption_of("red", "circle", "left")  # the same caption whatever the image
    acc = accuracy([blind] * len(scenes), scenes, POOL)
    assert acc == {"color": 0.25, "shape": 0.25, "position": round(1 / 3, 4), "format": 1.0}
    truth = [caption_of(s.color, s.shape, s.position) for s in scenes]
    assert accuracy(truth, scenes, POOL) == {"color": 1.0, "shape": 1.0, "position": 1.0, "format": 1.0}
    broken = [malform(t, rng, ["xyz"]) for t in truth]
    assert accuracy(broken, scenes, POOL)["format"] < 0.5
    with pytest.raises(ConfigError, match="one text per scene"):
        accuracy(truth[:-1], scenes, POOL)


def test_config_checks_every_argument_before_training():
    with pytest.raises(ConfigError, match=r"unknown dimension\(s\) \['colour'\].*valid names"):
        CaptionerWorldConfig(weights="colour=1")
    with pytest.raises(ConfigError, match="safety"):
        CaptionerWorldConfig(steering=("color=1", "safety=1"))
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        CaptionerWorldConfig(batch_size=10, num_generations=4)
    with pytest.raises(ConfigError, match="colors: need at least 2 distinct"):
        CaptionerWorldConfig(colors=("red",))
    with pytest.raises(ConfigError, match="'mauve'"):
        CaptionerWorldConfig(colors=("red", "mauve"))
    with pytest.raises(ConfigError, match="grpo_steps"):
        CaptionerWorldConfig(grpo_steps=-1)
    cfg = CaptionerWorldConfig(weights="color=1", steering=("position=1", "color=1.0"))
    assert cfg.runs() == [("color=1", "sum"), ("position=1", "sum")]  # the default run's weighting is trained once
    assert steering_target("color=1,overall=0.5") == "color"
    assert steering_target("overall=1") is None
    assert steering_target("color=1,shape=1") is None  # a tie steers towards nothing in particular


def test_cli_refuses_bad_weights_before_any_training(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--weights", "colour=1"]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and "valid names" in err
    assert not (tmp_path / "d").exists()  # nothing started
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--images", "x.png"]) == 2
    assert "--images needs --checkpoint" in capsys.readouterr().err


def _run(d: str, *extra: str) -> dict:
    assert main(["demo", "--output-dir", d, "--no-progress", *extra]) == 0
    return json.loads((__import__("pathlib").Path(d) / "report.json").read_text())


@pytest.mark.integration
def test_demo_report_and_a_short_learning_check(tmp_path, capsys):
    """The demo's judge, half its GRPO steps (150) with ``color=1``: held-out colour accuracy rises
    from chance (0.25: the warm start's colours are drawn independently of the image) by at least
    0.25, judged by string matching, never by the judge. At step 150 the full runs of seeds 0, 1, 2
    stood at 1.00, 0.92, 0.75 (README); a judge trained on colour alone is not enough (seed 1 stayed
    at 0.25 for 200 steps)."""
    d = str(tmp_path / "demo")
    report = _run(d, "--grpo-steps", "150", "--weights", "color=1")
    out = capsys.readouterr().out
    assert d in out.splitlines()[0] and "report:" in out.splitlines()[-1]  # the folder, at start and end
    j = report["judge"]
    assert j["val_mse"] < 0.5 * j["baseline_mse"]
    assert set(j["heads"]) == {"color", "shape", "position"}
    assert j["heads"]["color"]["pairwise_accuracy"] >= 0.9  # stage 1 taught colours
    cap = report["captioner"]
    assert cap["weights"] == "color=1" and cap["steps"] == 150 and cap["target"] == "color"
    assert set(cap["heldout"]) == {"color", "shape", "position", "format"}
    assert set(cap["reward"]) == {"first", "last"} and len(cap["rewards"]) == 150
    # Chance in expectation (the warm start's colours ignore the image); greedy decoding can still
    # lean on the image by accident (0.38 on one of seeds 0-4), never by half.
    assert cap["heldout"]["color"]["before"] < 0.5
    assert cap["heldout"]["color"]["after"] - cap["heldout"]["color"]["before"] >= 0.25, cap["heldout"]
    assert cap["reward"]["last"] > cap["reward"]["first"]
    assert [c["step"] for c in cap["curve"]] == [0, 50, 100, 150]
    assert report["plots"] == ["reward_curve.png", "heldout_accuracy.png", "samples.png"]
    for p in report["plots"]:
        assert (tmp_path / "demo" / p).read_bytes()[:4] == b"\x89PNG"
    assert "steering" not in report
    assert report["targets"] == check_targets(report)


def test_steering_report_shape(tmp_path):
    from multitap_rl.world import run_captioner_world
    from multitap_rl.world.report import final_table, write_plots

    cfg = CaptionerWorldConfig(steering=("color=1", "position=1"), judge_color_steps=10, judge_steps=0,
                               heads_n=64, warm_steps=2, grpo_steps=2, batch_size=8, n_train_images=16,
                               eval_repeats=1, eval_every=1, n_sheet=3)
    report, sheet = run_captioner_world(cfg, tmp_path / "work", log=lambda *a: None)
    assert [r["weights"] for r in report["steering"]] == ["color=1", "position=1"]
    assert report["steering"][0] is report["captioner"]  # trained once
    assert [r["target"] for r in report["steering"]] == ["color", "position"]
    for r in report["steering"]:
        assert set(r["heldout"]["position"]) == {"before", "after"}
        assert [c["step"] for c in r["curve"]] == [0, 1, 2]
    assert len(sheet) == 3 and len(report["captioner"]["samples"]) == 3
    assert write_plots(report, sheet, tmp_path) == ["reward_curve.png", "heldout_accuracy.png", "samples.png"]
    table = final_table(report)
    assert sum("<- target" in line for line in table) == 2


def test_multi_objective_runs_both_aggregations_and_reports_the_tradeoff(tmp_path):
    """Each multi-objective weighting: one weighted reward and one reward per dimension under TRL's
    normalize_then_sum, beside the single-dimension runs; report and trade-off plot."""
    from multitap_rl.world import run_captioner_world
    from multitap_rl.world.captioner import check_targets
    from multitap_rl.world.report import final_table, write_plots

    cfg = CaptionerWorldConfig(steering=("color=1", "position=1"), multi_objective=("color=1,position=1",),
                               judge_color_steps=10, judge_steps=0, heads_n=64, warm_steps=2, grpo_steps=2,
                               batch_size=8, n_train_images=16, eval_repeats=1, eval_every=1, n_sheet=3)
    assert cfg.runs() == [("color=1", "sum"), ("position=1", "sum"), ("color=1,position=1", "sum"),
                          ("color=1,position=1", "normalize_then_sum")]
    report, sheet = run_captioner_world(cfg, tmp_path / "work", log=lambda *a: None)
    mo = report["multi_objective"]
    assert [(r["weights"], r["aggregation"]) for r in mo] == cfg.runs()
    assert all(set(r["heldout"]) == {"color", "shape", "position"} for r in mo)
    assert [r["aggregation"] for r in report["combined"]] == ["sum", "normalize_then_sum"]
    assert "tradeoff.png" in write_plots(report, sheet, tmp_path) and (tmp_path / "tradeoff.png").stat().st_size
    assert sum("normalize_then_sum" in line for line in final_table(report)) == 5
    both = "color=1,position=1: every weighted attribute +0.2 under some aggregation"
    assert both in check_targets(report)
    fake = {"captioner": report["captioner"], "multi_objective": [
        {"weights": "color=1,position=1", "aggregation": agg,
         "heldout": {"color": {"before": 0.25, "after": c}, "position": {"before": 0.33, "after": p},
                     "shape": {"before": 0.25, "after": 0.25}}} for agg, c, p in
        [("sum", 0.9, 0.4), ("normalize_then_sum", 0.6, 0.6)]]}
    assert check_targets(fake)[both] is True  # the second aggregation raised both
    fake["multi_objective"][1]["heldout"]["position"]["after"] = 0.5
    assert check_targets(fake)[both] is False


def test_multi_objective_is_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match="multi_objective must be a tuple"):
        CaptionerWorldConfig(multi_objective="color=1,position=1")
    with pytest.raises(ConfigError, match="unknown dimension"):
        CaptionerWorldConfig(multi_objective=("colour=1,position=1",))
    assert main(["demo", "--multi-objective", "--multi-weights", " ; ", "--output-dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
