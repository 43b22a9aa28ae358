"""What a newcomer meets in the first hour: every missing package named at once before any work,
one overwrite rule for output folders, Ctrl-C as one line (status 130), the demo's judge kept and
usable by `score` / `rerank`, and plots that read right (chance lines, format, one panel per run)."""

from __future__ import annotations

import functools
import json
import random
import shlex
import sys
from pathlib import Path

import pytest

from multitap_rl.cli import main
from multitap_rl.errors import MissingDependencyError, require_all

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "stage1" / "tiny_shapes.yaml"


def _missing(monkeypatch, *packages):
    """Make ``packages`` look uninstalled (``sys.modules[name] = None``: import and find_spec fail)."""
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)


def _never_run(monkeypatch, module):
    def run(args):
        raise AssertionError("the command ran although a package it needs is missing")

    monkeypatch.setattr(module, "run", run)


# -- 1. missing extras: one message, before any work --------------------------------------------------
def test_require_all_names_every_missing_package_and_its_extra(monkeypatch):
    _missing(monkeypatch, "trl", "matplotlib")
    with pytest.raises(MissingDependencyError) as e:
        require_all([("trl", "trl"), ("json", "x"), ("datasets", "trl"), ("matplotlib", "plots"), ("trl", "trl")],
                    "the demo")
    msg = str(e.value)
    assert msg == ("the demo needs trl (extra 'trl') and matplotlib (extra 'plots'), not installed: "
                   "pip install 'multitap-rl[trl,plots]'")
    assert isinstance(e.value, ImportError)
    require_all([("json", "x"), ("datasets", "trl")], "the demo")  # all there: nothing raised
    _missing(monkeypatch, "ray")
    with pytest.raises(MissingDependencyError, match=r"ray\.serve \(extra 'serve'\)"):
        require_all([("ray.serve", "serve")], "serve")  # a dotted name whose parent is missing


def test_demo_names_every_missing_package_before_any_work(monkeypatch, tmp_path, capsys):
    from multitap_rl.commands import demo

    _never_run(monkeypatch, demo)
    _missing(monkeypatch, "trl", "datasets", "matplotlib")
    assert main(["demo", "--output-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["multitap-rl demo: error: this command needs trl, datasets (extra 'trl') and matplotlib "
                   "(extra 'plots'), not installed: pip install 'multitap-rl[trl,plots]'"], err
    assert not (tmp_path / "d").exists()
    # the real-model path needs no plots; with no GRPO steps, no TRL either
    assert demo.requirements(demo_args(checkpoint="x")) == [("trl", "trl"), ("accelerate", "trl"),
                                                             ("datasets", "trl")]
    assert demo.requirements(demo_args(checkpoint="x", grpo_steps=0)) == []


def demo_args(**kw):
    import argparse

    return argparse.Namespace(**{"checkpoint": None, "grpo_steps": None, **kw})


def test_the_world_itself_checks_its_packages_first(monkeypatch, tmp_path):
    from multitap_rl.world import CaptionerWorldConfig, run_captioner_world

    _missing(monkeypatch, "trl")
    with pytest.raises(MissingDependencyError, match=r"the captioner world needs trl \(extra 'trl'\)"):
        run_captioner_world(CaptionerWorldConfig(), tmp_path / "w")
    assert not (tmp_path / "w").exists()  # before any work


def test_train_stage1_names_accelerate_and_peft_at_once(monkeypatch, tmp_path, capsys):
    from multitap_rl.commands import train_stage1

    _never_run(monkeypatch, train_stage1)
    _missing(monkeypatch, "accelerate", "peft")
    assert main(["train-stage1", str(RECIPE), "train.finetune=lora", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("multitap-rl train-stage1: error: this command needs accelerate, peft (extra 'train'), not "
                   "installed: pip install 'multitap-rl[train]'"), err
    monkeypatch.undo()
    _missing(monkeypatch, "accelerate", "peft")
    assert main(["train-stage1", str(RECIPE), "--print-config"]) == 0  # prints the recipe: needs neither


def test_extract_needs_datasets_only_for_what_it_reads_through_it(monkeypatch, tmp_path, capsys):
    from multitap_rl.commands import extract

    monkeypatch.setattr(extract, "run", lambda args: 0)
    _missing(monkeypatch, "datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"image": "a.png", "text": "x"}\n')
    table = tmp_path / "rows.parquet"
    table.write_bytes(b"")
    common = ["extract", "--checkpoint", "c", "--out", str(tmp_path / "store")]
    assert main([*common, "--data", str(rows)]) == 0
    assert main([*common, "--data", str(table)]) == 2
    assert "needs datasets (extra 'train')" in capsys.readouterr().err


# -- 2. one overwrite rule ----------------------------------------------------------------------------
def test_make_shapes_refuses_an_existing_dir_and_overwrite_replaces_it_fully(tmp_path, capsys):
    d = tmp_path / "shapes"
    assert main(["make-shapes", str(d), "--n", "4", "--image-size", "16"]) == 0
    assert main(["make-shapes", str(d), "--n", "2", "--image-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty; pass --overwrite" in err and "another DIR" in err
    assert len((d / "rows.jsonl").read_text().splitlines()) == 4  # untouched
    assert main(["make-shapes", str(d), "--n", "2", "--image-size", "16", "--overwrite"]) == 0
    assert sorted(p.name for p in (d / "images").iterdir()) == ["00000.png", "00001.png"]  # no stale image
    assert sorted(p.name for p in d.iterdir()) == ["images", "rows.jsonl"]
    # a bad argument with --overwrite: the old output stays
    assert main(["make-shapes", str(d), "--n", "0", "--overwrite"]) == 2
    assert len((d / "rows.jsonl").read_text().splitlines()) == 2
    # a folder that is not make-shapes output is never emptied
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["make-shapes", str(other), "--n", "2", "--overwrite"]) == 2
    assert "holds no rows.jsonl" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep"


def test_demo_refuses_an_existing_output_dir_before_any_work(monkeypatch, tmp_path, capsys):
    import multitap_rl.world as world

    def never(*a, **k):
        raise AssertionError("trained although the output folder is refused")

    monkeypatch.setattr(world, "run_captioner_world", never)
    d = tmp_path / "demo"
    d.mkdir()
    (d / "report.json").write_text("{}")
    assert main(["demo", "--output-dir", str(d)]) == 2
    assert "already exists and is not empty; pass --overwrite to replace it, or another --output-dir" in \
        capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["demo", "--output-dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


# -- 3. Ctrl-C -----------------------------------------------------------------------------------------
def _interrupt(*a, **k):
    raise KeyboardInterrupt


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    from multitap_rl.commands import extract, presets

    monkeypatch.setattr(presets, "run", _interrupt)
    assert main(["presets"]) == 130
    err = capsys.readouterr().err
    assert err == "multitap-rl presets: interrupted\n"
    monkeypatch.setattr(extract, "run", _interrupt)
    args = ["extract", "--checkpoint", "c", "--data", "d.jsonl", "--out", "o"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err == "multitap-rl extract: interrupted; rerun the same command to resume\n"
    assert main([*args, "--overwrite"]) == 130
    assert "rerun the same command without --overwrite to resume" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # -v keeps the traceback
        main(["-v", "presets"])


def test_an_interrupted_demo_says_it_cannot_resume_and_leaves_the_old_output(monkeypatch, tmp_path, capsys):
    import multitap_rl.world as world

    monkeypatch.setattr(world, "run_captioner_world", _interrupt)
    fresh = tmp_path / "fresh"
    assert main(["demo", "--output-dir", str(fresh), "--no-progress"]) == 130
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]  # one line, no traceback
    assert "Traceback" not in err and sum(line.startswith("multitap-rl demo: interrupted")
                                          for line in err.splitlines()) == 1
    assert last.startswith("multitap-rl demo: interrupted; the demo cannot resume") and "run it again" in last
    assert not fresh.exists()  # created for the run, removed again: nothing half-written
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text('{"old": 1}')
    assert main(["demo", "--output-dir", str(old), "--overwrite", "--no-progress"]) == 130
    assert f"{old} is as it was before this run" in capsys.readouterr().err
    assert sorted(p.name for p in old.iterdir()) == ["report.json"]  # the old report kept, no staging left
    assert json.loads((old / "report.json").read_text()) == {"old": 1}


# -- 4. the demo keeps its judge -------------------------------------------------------------------------
@pytest.mark.integration
def test_demo_keeps_its_judge_for_score_and_rerank(monkeypatch, tmp_path, capsys):
    """A tiny demo (a few steps of everything) into a folder of an earlier run, with --overwrite: the
    folder then holds exactly the new run's files; the judge's checkpoint names its kept base model;
    the two commands printed at the end run as printed."""
    import multitap_rl.world as world

    monkeypatch.setattr(world, "CaptionerWorldConfig", functools.partial(
        world.CaptionerWorldConfig, judge_color_steps=4, heads_n=32, batch_size=8, n_train_images=8,
        eval_repeats=1, eval_every=0, n_sheet=2))
    d = tmp_path / "demo"
    d.mkdir()
    (d / "report.json").write_text("{}")
    (d / "stale.png").write_bytes(b"old")
    assert main(["demo", "--output-dir", str(d), "--overwrite", "--no-progress", "--judge-steps", "0",
                 "--warm-steps", "1", "--grpo-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in d.iterdir()) == ["heldout_accuracy.png", "judge", "report.json",
                                                   "reward_curve.png", "samples.png"]
    assert sorted(p.name for p in (d / "judge").iterdir()) == ["base", "candidates.txt", "example.png", "heads",
                                                               "model"]
    meta = json.loads((d / "judge" / "model" / "multitap_config.json").read_text())
    assert meta["base_model"] == str((d / "judge" / "base").resolve())
    assert (d / "judge" / "base" / "tokenizer.json").is_file() and (d / "judge" / "base" / "config.json").is_file()
    report = json.loads((d / "report.json").read_text())
    assert report["plots"] == ["reward_curve.png", "heldout_accuracy.png", "samples.png"]
    assert report["judge"]["saved"]["model"] == str((d / "judge" / "model").resolve())
    lines = out.splitlines()
    assert "report:" in lines[-1]
    commands = [shlex.split(line.strip()) for line in lines if line.startswith("  multitap-rl ")]
    assert [c[1] for c in commands] == ["score", "rerank"]
    assert main(commands[0][1:]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert set(scored["multitap"]) == {"overall", "color", "shape", "position"}
    assert main(commands[1][1:]) == 0
    ranked = capsys.readouterr().out.strip().splitlines()
    assert len(ranked) == 4 and all("color=" in line for line in ranked)


# -- 5. plots ------------------------------------------------------------------------------------------
def _fake_run(weights: str, seed: int, steps: int = 20) -> dict:
    rng = random.Random(seed)
    curve = [{"step": s, "color": 0.25 + s / 40, "shape": 0.25, "position": 0.33, "format": 0.9}
             for s in range(0, steps + 1, 10)]
    return {"weights": weights, "aggregation": "sum", "target": None, "curve": curve,
            "rewards": [rng.random() * (seed + 1) for _ in range(steps)],
            "samples": [{"truth": "a red circle on the left", "before": "x", "after": "y"}],
            "heldout": {a: {"before": 0.25, "after": 0.5} for a in ("color", "shape", "position", "format")},
            "reward": {"first": 0.1, "last": 0.2}}


def test_plots_chance_lines_format_line_legend_below_and_one_reward_panel_per_run(monkeypatch, tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    from multitap_rl.world.report import write_plots

    saved = {}
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (saved.__setitem__(Path(path).name, fig),
                                                                    real(fig, path, **kw)))
    cap = _fake_run("color=1", 0)
    report = {"captioner": cap, "steering": [cap, _fake_run("position=2", 1)],
              "config": {"colors": ["red", "green", "blue", "yellow"], "shapes": ["circle", "square", "cross"],
                         "positions": ["left", "top", "center"]}}
    assert write_plots(report, [Image.new("RGB", (16, 16))], tmp_path)[:2] == ["reward_curve.png",
                                                                               "heldout_accuracy.png"]
    held = saved["heldout_accuracy.png"]
    axes = [ax for ax in held.axes if ax.get_visible() and ax.axison]
    assert len(axes) == 2
    for ax in axes:
        assert ax.get_legend() is None  # nothing drawn over the curves
        dotted = sorted(round(float(line.get_ydata()[0]), 4) for line in ax.lines if line.get_linestyle() == ":")
        assert dotted == [0.25, round(1 / 3, 4), round(1 / 3, 4)]  # colour 1/4, shape 1/3 (this pool), position
        assert "format" in [line.get_label() for line in ax.lines]
    legend = held.legends[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(held).get_renderer()  # the figure was closed after saving
    box = legend.get_window_extent(renderer)
    assert all(box.y1 <= ax.get_tightbbox(renderer).y0 for ax in axes)  # below the panels and their labels
    assert any("chance" in t.get_text() for t in legend.get_texts())
    curves = [ax for ax in saved["reward_curve.png"].axes if ax.axison]
    assert [ax.get_title() for ax in curves] == ["color=1", "position=2"]  # one panel per run
    assert all(len(ax.lines) == 1 for ax in curves)
