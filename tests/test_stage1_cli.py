"""``multitap-rl train-stage1 RECIPE [KEY=VALUE ...]``."""

import json
import re
from pathlib import Path

import pytest
import yaml

from multitap_rl.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "stage1" / "tiny_shapes.yaml"


def test_print_config_applies_overrides(capsys):
    assert main(["train-stage1", str(RECIPE), "train.learning_rate=1e-5", "data.dataset_kwargs.n_train=7",
                 "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["learning_rate"] == 1e-5 and cfg["data"]["dataset_kwargs"]["n_train"] == 7
    assert cfg["data"]["dataset_kwargs"]["colors"] == ["red", "green", "blue"]  # the rest of the file kept


def test_dry_run_checks_data_without_training(tmp_path, capsys):
    assert main(["train-stage1", str(RECIPE), "data.dataset_kwargs.n_train=10", "data.dataset_kwargs.n_eval=4",
                 f"train.output_dir={tmp_path / 'out'}", "--dry-run"]) == 0
    assert "10 training rows, 4 evaluation rows" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,match", [
    (["train.lerning_rate=1"], "did you mean 'learning_rate'"),
    (["train.batch_size"], "KEY=VALUE"),
    (["data.score_range=[0, 0.5]"], "row .*: score 1.0 is outside the declared range"),
])
def test_bad_input_exits_2_with_the_reason(extra, match, capsys):
    assert main(["train-stage1", str(RECIPE), "data.dataset_kwargs.n_train=8", *extra, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("multitap-rl train-stage1: error:")
    assert re.search(match, err), err


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["train-stage1", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_trains_end_to_end_and_prints_the_result(tiny_dirs, tmp_path, capsys):
    from multitap_rl import MultiTapModel
    from multitap_rl.testing import make_image

    base, _ = tiny_dirs
    out = tmp_path / "run"
    assert main(["train-stage1", str(RECIPE), f"model.base_model={base}", "model.image_size=56",
                 f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2", "train.progress=false",
                 "data.dataset_kwargs.n_train=8", "data.dataset_kwargs.n_eval=4"]) == 0
    out_text = capsys.readouterr().out
    res = json.loads(out_text[out_text.index("{\n"):])  # (deepspeed may print a warning to stdout first)
    assert res["global_step"] == 2 and set(res["models"]) == {"multitap", "released"}
    assert (out / "config.yaml").is_file() and (out / "log.jsonl").is_file()
    model = MultiTapModel.from_pretrained(res["models"]["released"], device="cpu", image_size=56)
    score = model.score([make_image(0)], ["a red circle"]).overall
    assert score.shape == (1,) and 0 < float(score) < 1


def test_stdout_is_the_json_result_alone(tmp_path, capsys, monkeypatch):
    """Whatever a library prints while training (DeepSpeed's accelerator notice, say) goes to stderr;
    stdout holds the machine-readable result alone."""
    from multitap_rl.training import stage1
    from multitap_rl.training.stage1 import Stage1Result

    def fake_train(cfg, overwrite=False):
        print("[WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.")
        return Stage1Result(output_dir=tmp_path, model_dirs={"multitap": tmp_path / "model"}, global_step=3,
                            resumed_from=None, metrics={"mse": 0.1}, history=[])

    monkeypatch.setattr(stage1, "train_stage1", fake_train)
    assert main(["train-stage1", str(RECIPE), f"train.output_dir={tmp_path}"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["global_step"] == 3
    assert "Setting accelerator to CPU" in err
