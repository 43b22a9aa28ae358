"""The README's offline stage-2 walk-through, run command by command (fewer rows and steps)."""

import json
from pathlib import Path

import pytest

from multitap_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "color_correct,shape_correct,position_correct"


@pytest.mark.integration
def test_offline_stage2_walkthrough(tmp_path, capsys):
    r = tmp_path / "runs"
    steps = [
        ["tiny", str(r / "tiny"), "--initializer-range", "0.125"],
        ["train-stage1", str(ROOT / "recipes" / "stage1" / "tiny_shapes.yaml"), f"model.base_model={r}/tiny/base",
         f"train.output_dir={r}/tiny_shapes", "train.max_steps=20", "train.progress=false",
         "data.dataset_kwargs.n_train=64", "data.dataset_kwargs.n_eval=16"],
        ["make-shapes", str(r / "shapes"), "--n", "96", "--seed", "1"],
        ["make-shapes", str(r / "shapes-val"), "--n", "48", "--seed", "2"],
        ["extract", "--checkpoint", f"{r}/tiny_shapes/model", "--data", f"{r}/shapes/rows.jsonl",
         "--target-columns", TARGETS, "--out", f"{r}/feats", "--no-progress"],
        ["fit-heads", "--features", f"{r}/feats", "--out", f"{r}/heads", "--val-fraction", "0.2"],
        ["extract", "--checkpoint", f"{r}/tiny_shapes/model", "--data", f"{r}/shapes-val/rows.jsonl",
         "--target-columns", TARGETS, "--out", f"{r}/val_feats", "--no-progress"],
        ["eval", "--features", f"{r}/val_feats", "--heads", f"{r}/heads", "--json", f"{r}/eval.json"],
    ]
    for args in steps:
        assert main(args) == 0, (args, capsys.readouterr().err)
    report = json.loads((r / "eval.json").read_text())
    assert set(TARGETS.split(",")) <= set(report)
    assert all(0.0 <= report[d]["pairwise_acc"] <= 1.0 for d in TARGETS.split(","))
    assert "color_correct" in capsys.readouterr().out  # the table
