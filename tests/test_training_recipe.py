"""Dataclass-backed YAML recipes: overrides, strict keys and types, the bundled recipes."""

from pathlib import Path

import pytest

from multitap_rl.errors import ConfigError
from multitap_rl.training.config import Stage1Config, load_stage1_config
from multitap_rl.training.recipe import config_to_dict, load_recipe, parse_overrides, save_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_parse_overrides_hand_computed():
    got = parse_overrides(["train.learning_rate=1e-5", "a.b.c=[x, 2]", "flag=true", "name=null", "s=hello world"])
    assert got == {"train": {"learning_rate": "1e-5"}, "a": {"b": {"c": ["x", 2]}}, "flag": True, "name": None,
                   "s": "hello world"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["train.learning_rate"])
    with pytest.raises(ValueError, match="bad key"):
        parse_overrides(["train..lr=1"])


def test_load_with_overrides_and_coercion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  base_model: some/base\n  image_size: 112\ntrain:\n  learning_rate: 2.0e-7\n"
                    "data:\n  score_range: [1, 5]\n")
    cfg = load_stage1_config(path, ["train.learning_rate=1e-5", "train.finetune=lora", "lora.target_modules=[q_proj]",
                                    "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"  # a bare YAML `no` is False; the choice field takes it
    assert cfg.train.learning_rate == 1e-5  # "1e-5" is a YAML string; the float field takes it
    assert cfg.train.finetune == "lora" and cfg.lora.target_modules == ["q_proj"]
    assert cfg.data.score_range == (1.0, 5.0) and cfg.model.image_size == 112
    assert cfg.train.batch_size == 1  # defaults fill what the file leaves out
    # round trip through YAML
    save_recipe(cfg, tmp_path / "out.yaml", header="hello")
    assert (tmp_path / "out.yaml").read_text().startswith("# hello\n")
    assert config_to_dict(load_stage1_config(tmp_path / "out.yaml")) == config_to_dict(cfg)


@pytest.mark.parametrize("overrides,match", [
    (["train.lerning_rate=1"], r"unknown key 'train.lerning_rate' \(did you mean 'learning_rate'\?\)"),
    (["trian.seed=1"], "unknown key 'trian'"),
    (["train.batch_size=two"], "train.batch_size: expected an integer"),
    (["train.batch_size=0"], "train.batch_size must be positive"),
    (["train.finetune=qlora"], "train.finetune: must be one of"),
    (["train.progress=maybe"], "train.progress: expected true/false"),
    (["data.score_range=[1]"], "data.score_range: expected 2 values"),
    (["data.score_range=[5, 1]"], "score_range must be lo < hi"),
    (["train.save_layouts=[hub]"], "save_layouts"),
    (["model.base_model=null"], "model.base_model"),
])
def test_bad_recipes_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_stage1_config({"model": {"base_model": "x/y"}}, overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        load_stage1_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_stage1_config(bad)


@pytest.mark.parametrize("path", sorted((RECIPES / "stage1").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_stage1_recipes_load_and_say_how_to_launch(path):
    cfg = load_recipe(Stage1Config, path)
    assert cfg.model.base_model or cfg.model.checkpoint
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "train-stage1" in header and str(path.relative_to(RECIPES.parent)) in header


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_accelerate_configs_parse(path):
    import yaml

    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED"}
    assert "accelerate launch --config_file " + str(path.relative_to(RECIPES.parent)) in path.read_text()
    if cfg["distributed_type"] == "DEEPSPEED":
        assert cfg["deepspeed_config"]["zero_stage"] in (2, 3)
        assert "gradient_accumulation_steps" not in cfg["deepspeed_config"]  # the recipe's value rules
