"""What a newcomer hits in the first hour: mistakes refused before any work, checkpoints that name
their base model, errors that say what to pass, and examples that keep stdout for results."""

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _examples import EXAMPLES, load_example

from multitap_rl import ModelSpec, MultiTapModel
from multitap_rl.cli import main
from multitap_rl.data.rows import open_rows
from multitap_rl.errors import CheckpointError, DataError, HeadsError, SampleError
from multitap_rl.images import load_image
from multitap_rl.testing import build_tiny_multitap, make_image
from multitap_rl.schemas import ObjectiveSchema
from multitap_rl.training.features import check_target_columns, extract_features, load_features

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
ROWS = [{"image": "a.png", "text": "a red circle", "color_correct": 1.0, "shape_correct": 0.0},
        {"image": "b.png", "text": "a blue square", "color_correct": 0.0}]  # shape_correct left out: NaN


# -- 1a. unknown target columns are refused before extraction ------------------------------------------------
def test_extract_refuses_a_misspelt_target_column_before_loading_the_model(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # the checkpoint does not exist: the column check must come first, before the model is looked at
    code = main(["extract", "--checkpoint", str(tmp_path / "no-model"), "--data", str(data),
                 "--target-columns", "color_corect", "--out", str(tmp_path / "feats"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no column 'color_corect' (given by --target-columns)" in err[0]
    assert "did you mean 'color_correct'?" in err[0]
    assert "image, text, color_correct, shape_correct" in err[0]
    assert not (tmp_path / "feats").exists()


def test_extract_features_refuses_a_schema_column_the_data_lacks_before_any_work(tmp_path):
    schema = {"name": "pairs", "samples": [{"image": "image", "text": "text", "tag": "1"},
                                           {"image": "image", "text": "text", "tag": "2"}],
              "dimensions": [{"name": "quality", "column": "quality_{tag}"}]}
    rows = [{"image": "a.png", "text": "x", "quality_1": 1.0}]
    with pytest.raises(DataError, match=r"no column 'quality_2' \(dimension 'quality' of schema 'pairs'\)"):
        extract_features(None, rows, tmp_path / "s", schema=schema, progress=False)  # no model needed to refuse
    assert not (tmp_path / "s").exists()


def test_a_column_some_rows_leave_out_is_not_refused():
    schema = ObjectiveSchema.simple(["color_correct", "shape_correct"])
    check_target_columns(schema, open_rows(ROWS))  # shape_correct is in row 0 only: fine (row 1 is unrated)
    with pytest.raises(DataError, match="no column 'shape_correct'"):  # not in the rows that will be read
        check_target_columns(schema, open_rows(ROWS[::-1], limit=1))
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": ["a.png"], "text": ["x"], "color_correct": [None]})
    check_target_columns(ObjectiveSchema.simple(["color_correct"]), open_rows(ds))  # a column, all null: present
    with pytest.raises(DataError, match=r"no column 'colour' .*the data's columns are: image, text, color_correct"):
        check_target_columns(ObjectiveSchema.simple(["colour"]), open_rows(ds))


# -- 1a. fit-heads: NaN targets get the option that handles them, or a reason none can ----------------------
class FakeModel:
    """Just enough of a MultiTapModel for extract_features: features from the text, no images."""

    hidden_size = 8
    info: dict = {}
    backbone = SimpleNamespace(settings=SimpleNamespace(as_dict=dict))

    def features(self, images, texts, questions=None):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(64, self.hidden_size, generator=g)
        bags = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for word in t.split():
                bags[i, sum(map(ord, word)) % 64] += 1.0
        return bags @ w

    def overall_from_features(self, h):
        return h[:, 0].sigmoid()


def _store(tmp_path, scores) -> Path:
    words = "red green blue circle square left right top small large".split()
    rows = [{"image": "x.png", "text": " ".join(words[(i * k) % 10] for k in (1, 3, 7)), "score": s}
            for i, s in enumerate(scores)]
    return extract_features(FakeModel(), rows, tmp_path / "feats", schema=ObjectiveSchema.simple(["score"]),
                            progress=False)


def test_fit_heads_on_an_all_nan_dimension_says_no_nan_policy_helps(tmp_path, capsys):
    store = _store(tmp_path, [None] * 8)
    for policy in ("error", "drop"):
        code = main(["fit-heads", "--features", str(store), "--out", str(tmp_path / "h"), "--nan-policy", policy])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "dimension 'score' has no rated sample (all 8 targets are NaN" in err[0]
        assert "column 'score' was missing or empty" in err[0] and "no --nan-policy can fit it" in err[0]
    assert not (tmp_path / "h").exists()


def test_fit_heads_with_some_nan_names_the_option_and_the_option_works(tmp_path, capsys):
    store = _store(tmp_path, [0.1, None, 0.5, 0.9, 0.3, None, 0.7, 0.2])
    assert np.isnan(load_features(store).targets[:, 0]).sum() == 2
    code = main(["fit-heads", "--features", str(store), "--out", str(tmp_path / "h")])
    err = capsys.readouterr().err
    assert code == 2 and "unrated (NaN) for 2 of 8 samples (data rows 1, 5)" in err
    assert "pass --nan-policy drop to fit it on its 6 rated samples" in err
    assert main(["fit-heads", "--features", str(store), "--out", str(tmp_path / "h"), "--nan-policy", "drop"]) == 0
    assert "score" in capsys.readouterr().out


# -- 1b. a local path that does not exist is refused when the reward is made -------------------------------
@pytest.mark.parametrize("path", ["/nonexistent/multitap", "./no-such-ckpt", "../no-such-ckpt", "~/no-such-ckpt-x1",
                                  "runs/tiny/reward", "reward"])
def test_a_missing_local_checkpoint_fails_when_the_reward_is_made(path, tmp_path, monkeypatch):
    from reward_fns import ddpo_reward, multitap_reward

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path!r}: no such file or directory")):
        multitap_reward(path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        ddpo_reward(ModelSpec(checkpoint=path))


def test_hub_ids_urls_and_existing_paths_stay_lazy(tiny_dirs, tmp_path, monkeypatch):
    from reward_fns import multitap_reward
    from reward_fns.core import resolve_model

    base, reward = tiny_dirs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lazy = multitap_reward("org/not-here")  # a hub id: nothing is fetched until the first call
    with pytest.raises(CheckpointError, match="not available offline"):
        lazy(prompts=[PROMPT], completions=["a caption"], image=[make_image(0)])
    assert resolve_model("http://localhost:1")[0].is_remote  # a served reward's URL is not a path
    multitap_reward(str(reward), base_model=str(base))
    with pytest.raises(CheckpointError, match=r"base model '/no/base': no such file or directory"):
        multitap_reward(str(reward), base_model="/no/base")
    with pytest.raises(HeadsError, match=r"heads 'my-heads': no such file or directory"):
        multitap_reward(str(reward), heads="my-heads")


def test_a_loaded_model_whose_folder_was_moved_still_makes_a_reward(tiny_dirs, tmp_path):
    from reward_fns import multitap_reward

    base, reward = tiny_dirs
    moved = Path(shutil.copytree(reward, tmp_path / "ckpt"))
    model = MultiTapModel.from_pretrained(moved, base_model=base, device="cpu", image_size=56)
    shutil.rmtree(moved)
    fn = multitap_reward(model)
    assert len(fn(prompts=[PROMPT], completions=["a caption"], image=[make_image(0)])) == 1


# -- 2a. checkpoints we write name their base model ----------------------------------------------------------
def test_tiny_names_its_base_model_and_loads_the_same(tmp_path, monkeypatch):
    assert main(["tiny", str(tmp_path / "t")]) == 0
    base, reward = tmp_path / "t" / "base", tmp_path / "t" / "reward"
    meta = json.loads((reward / "multitap_config.json").read_text())
    assert meta["base_model"] == str(base.resolve()) and Path(meta["base_model"]).is_absolute()
    monkeypatch.chdir(tmp_path / "t")  # the recorded path does not depend on the working directory
    alone = MultiTapModel.from_pretrained("reward", device="cpu", image_size=56)
    given = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=56)
    assert alone.info["base_model"] == str(base.resolve())
    assert alone.info["fingerprint"] == given.info["fingerprint"]
    assert alone.backbone.settings == given.backbone.settings  # the file names nothing but the base model
    images, texts = [make_image(0), make_image(1)], ["A red circle.", "Two dogs."]
    assert torch.equal(alone.score(images, texts).overall, given.score(images, texts).overall)
    # the library builder keeps the released layout's files exactly (stored reference scores hash them)
    _, plain = build_tiny_multitap(tmp_path / "plain", seed=0)
    assert not (plain / "multitap_config.json").exists()
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in reward.iterdir()
                                                             if p.name != "multitap_config.json")


# -- 2b. the training output folder instead of its model/ ----------------------------------------------------
def test_a_training_output_folder_says_pass_dir_model(tiny_dirs, tmp_path, capsys):
    base, reward = tiny_dirs
    run = tmp_path / "run"
    shutil.copytree(reward, run / "model")
    (run / "checkpoint-3").mkdir()
    for kwargs in ({}, {"base_model": base}):  # with or without a base model: the same advice
        with pytest.raises(CheckpointError, match=r"training output folder, not a checkpoint: pass .*run/model$"):
            MultiTapModel.from_pretrained(run, device="cpu", **kwargs)
    make_image(0).save(tmp_path / "x.png")
    code = main(["score", "--checkpoint", str(run), "--image", str(tmp_path / "x.png"), "--text", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"pass {run / 'model'}" in err[0], err
    shutil.rmtree(run / "model")  # training not finished: only resumable state
    with pytest.raises(CheckpointError, match=r"without a final model yet \(checkpoint-3 holds resumable"):
        MultiTapModel.from_pretrained(run, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json there"):
        MultiTapModel.from_pretrained(tmp_path / "empty", device="cpu")


# -- 3c. an undecodable image says what was given ------------------------------------------------------------
def test_undecodable_bytes_are_described_not_a_buffer_address(tmp_path):
    with pytest.raises(SampleError) as info:
        load_image(b"not an image", 0)
    msg = str(info.value)
    assert "BytesIO" not in msg and "0x" not in msg
    assert msg == ("image 0: cannot decode bytes as an image: 12 bytes that are not an image PIL can read "
                   "(first bytes: b'not an image')")
    buf = io.BytesIO()
    make_image(0).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:100])
    with pytest.raises(SampleError, match=r"cannot decode file .*cut.png as an image: .*\(100 bytes, first bytes: "
                                          r"b'\\x89PNG") as info:
        load_image(str(tmp_path / "cut.png"), 1)
    assert "BytesIO" not in str(info.value)


# -- 3a. text-to-image examples: a short summary line, each its own logger ------------------------------------
def test_t2i_examples_print_a_short_summary(capsys):
    ex = load_example("ddpo_t2i")
    summary = {"trainable_tensors": 4, "changed_tensors": 4, "zero_init_tensors": 2, "zero_init_moved": 2,
               "reward_means": [0.5 + i / 4000 for i in range(1000)], "image_min": 0.0, "image_max": 1.0,
               "image_shape": [4, 3, 32, 32], "dims": ["overall"]}
    got = ex.cli_main(lambda argv: SimpleNamespace(tiny=False), lambda args: summary, [])
    assert got is summary  # callers still get every number
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and len(out[0]) < 400, out
    line = json.loads(out[0])
    assert "reward_means" not in line and line["reward_calls"] == 1000
    means = summary["reward_means"]  # windowed: the first and last tenth of the calls
    assert line["reward"] == pytest.approx({"first": sum(means[:100]) / 100, "last": sum(means[-100:]) / 100,
                                            "window": 100})


def test_alignprop_logs_under_its_own_name(monkeypatch):
    ex = load_example("alignprop_t2i")
    seen = {}

    def prepare(args, workdir, make_reward, reward_fn=None, log=None):
        seen["log"] = log
        return object(), object(), object(), "no"

    monkeypatch.setattr(ex, "import_trl", lambda *names: (lambda **kw: kw, lambda *a: a))
    monkeypatch.setattr(ex, "prepare", prepare)
    ex.build(ex.parse_args(["--tiny"]), "work")
    assert seen["log"].name == "alignprop_t2i"
    shared = load_example("ddpo_t2i")
    reward = shared.RecordingReward(lambda i, p, m: (torch.ones(len(p)), {}), log=seen["log"])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    seen["log"].addHandler(handler)
    seen["log"].setLevel(logging.INFO)
    try:
        reward(torch.zeros(2, 3, 4, 4), ["a", "b"], [{}, {}])
    finally:
        seen["log"].removeHandler(handler)
    assert [r.name for r in records] == ["alignprop_t2i"]


# -- 3b. the GRPO example: stdout empty, the bar labelled ----------------------------------------------------
@pytest.mark.integration
def test_grpo_example_keeps_stdout_empty_and_labels_its_bar(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / "grpo_captioner.py"), "--tiny", "--max-steps", "1",
                          "--num-generations", "2", "--batch-size", "2", "--max-completion-length", "4"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == ""
    assert "GRPO steps" in out.stderr and "1 steps; mean reward per step" in out.stderr
    assert "'loss'" not in out.stderr  # TRL's per-step dicts are not printed anywhere by default
