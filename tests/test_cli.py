"""The CLI: score single pairs and JSONL files; bad input exits non-zero naming the row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from multitap_rl.cli import main


@pytest.fixture()
def rows_file(tmp_path, images):
    lines = []
    for i, img in enumerate(images[:3]):
        img.save(tmp_path / f"im{i}.png")
        row = {"image": f"im{i}.png", "text": ["A red circle.", "Two dogs.", "A tree."][i], "id": i}
        if i == 2:
            row["question"] = "What is shown?"
        lines.append(json.dumps(row))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(tiny_dirs):
    base, reward = tiny_dirs
    return ["--checkpoint", str(reward), "--base-model", str(base), "--device", "cpu"]


def test_score_jsonl_in_order_matches_library(tiny_dirs, tiny_model, images, rows_file, tmp_path, capsys):
    out = tmp_path / "out" / "scores.jsonl"
    assert main(["score", *_args(tiny_dirs), "--input", str(rows_file), "--output", str(out),
                 "--batch-size", "2"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [0, 1, 2]
    assert [r["image"] for r in got] == ["im0.png", "im1.png", "im2.png"]  # the row's fields as written
    lib = tiny_model.score(images[:2], ["A red circle.", "Two dogs."]).overall
    assert abs(got[0]["multitap"]["overall"] - float(lib[0])) < 1e-6
    assert abs(got[1]["multitap"]["overall"] - float(lib[1])) < 1e-6
    q = tiny_model.score(images[2:3], ["A tree."], ["What is shown?"]).overall
    assert abs(got[2]["multitap"]["overall"] - float(q[0])) < 1e-6
    err = capsys.readouterr().err
    assert "scoring" in err  # progress bar on stderr
    assert f"scored 3 of 3 row(s) -> {out}" in err  # where the output went


def test_score_single_pair_to_stdout(tiny_dirs, tiny_model, images, tmp_path, capsys):
    images[0].save(tmp_path / "a.png")
    assert main(["score", *_args(tiny_dirs), "--image", str(tmp_path / "a.png"), "--text", "A red circle."]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert abs(record["multitap"]["overall"] - float(tiny_model.score(images[:1], ["A red circle."]).overall[0])) < 1e-6


@pytest.mark.parametrize(
    "row, match",
    [
        ({"image": "missing.png", "text": "x"}, "rows.jsonl: line 2: image: file not found"),
        ({"image": "im0.png"}, "rows.jsonl: line 2: text: missing field 'text'"),
        ({"image": "im0.png", "text": " "}, "rows.jsonl: line 2: text: empty or not a string"),
        ({"image": "corrupt.png", "text": "x"}, "rows.jsonl: line 2: image: cannot decode file"),
        ({"image": "im0.png", "text": "x", "multitap": 1}, "line 2: multitap: the row already has a 'multitap' field"),
    ],
)
def test_bad_rows_exit_nonzero_naming_the_row(tiny_dirs, images, tmp_path, capsys, row, match):
    images[0].save(tmp_path / "im0.png")
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": "im0.png", "text": "ok"}) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "o.jsonl"
    code = main(["score", *_args(tiny_dirs), "--input", str(path), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert any(match in line for line in err), err
    assert not out.exists()  # no partial output


def test_console_script_tiny_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "multitap_rl.cli", "tiny", str(tmp_path / name), "--seed", "3"],
                       check=True, capture_output=True)
    for sub in ("base", "reward"):
        files = sorted(p.name for p in (tmp_path / "a" / sub).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "b" / sub).iterdir())
        for f in files:
            a, b = (tmp_path / "a" / sub / f), (tmp_path / "b" / sub / f)
            if f == "multitap_config.json":  # names its own base model by absolute path; the rest equal
                ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
                assert ja.pop("base_model") == str((tmp_path / "a" / "base").resolve())
                assert jb.pop("base_model") == str((tmp_path / "b" / "base").resolve())
                assert ja == jb
            else:
                assert a.read_bytes() == b.read_bytes(), f
    assert (tmp_path / "a" / "reward" / "model.safetensors.index.json").is_file()


def test_tiny_initializer_range_sets_the_weights_std(tmp_path, capsys):
    from multitap_rl.checkpoint import read_state_dict

    assert main(["tiny", str(tmp_path / "t"), "--initializer-range", "0.125"]) == 0
    base = tmp_path / "t" / "base"
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["initializer_range"] == 0.125 and cfg["vision_config"]["initializer_range"] == 0.125
    sd = read_state_dict(base)
    for key in ("model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight"):
        assert float(sd[key].std()) == pytest.approx(0.125, rel=0.05), key
    assert main(["tiny", str(tmp_path / "u"), "--initializer-range", "0"]) == 2
    assert "initializer_range must be > 0" in capsys.readouterr().err


def test_demo_with_a_checkpoint_reranks_and_runs_grpo_steps(tiny_dirs, capsys):
    """``demo --checkpoint``: the real-model path (the offline world is tested in test_world.py)."""
    import re

    base, ckpt = tiny_dirs
    assert main(["demo", "--checkpoint", str(ckpt), "--base-model", str(base), "--grpo-steps", "1",
                 "--weights", "overall=1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rankings = re.findall(r"  image \d+:\n((?:    \d\. .*\n)+)", out)
    assert len(rankings) == 3 and all(len(r.strip().splitlines()) == 4 for r in rankings)
    assert "weights overall=1" in out
    assert "[3/3] GRPO: 1 steps against the weighted reward" in out
    assert main(["demo", "--checkpoint", str(ckpt), "--base-model", str(base), "--weights", "color=1"]) == 2
    assert "unknown dimension(s) ['color']" in capsys.readouterr().err


def test_score_image_size_and_max_length_options(tiny_dirs, images, tmp_path, capsys):
    from multitap_rl import MultiTapModel

    base, reward = tiny_dirs
    images[0].save(tmp_path / "a.png")
    assert main(["score", *_args(tiny_dirs), "--image", str(tmp_path / "a.png"), "--text", "A red circle.",
                 "--image-size", "112", "--max-length", "none"]) == 0
    got = json.loads(capsys.readouterr().out.strip())["multitap"]["overall"]
    small = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112, max_length=None)
    assert got == pytest.approx(float(small.score(images[:1], ["A red circle."]).overall[0]), abs=1e-6)
    with pytest.raises(SystemExit):
        main(["score", *_args(tiny_dirs), "--image", "x", "--text", "y", "--image-size", "0"])


def test_score_on_invalid_skip_writes_every_row_with_its_error(tiny_dirs, tiny_model, images, tmp_path, capsys):
    images[0].save(tmp_path / "im0.png")
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    rows = [{"image": "im0.png", "text": "ok", "overall": "mine"}, {"image": "corrupt.png", "text": "x"},
            {"image": "missing.png", "text": "y"}, {"image": "im0.png", "text": "also ok", "_line": 7}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    assert main(["score", *_args(tiny_dirs), "--input", str(path), "--output", str(out), "--on-invalid", "skip"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "multitap"} for g in got] == rows  # the user's fields untouched
    assert "cannot decode" in got[1]["multitap"]["error"] and "line 2" in got[1]["multitap"]["error"]
    assert "file not found" in got[2]["multitap"]["error"]
    want = tiny_model.score([images[0], images[0]], ["ok", "also ok"]).overall
    assert [got[0]["multitap"]["overall"], got[3]["multitap"]["overall"]] == pytest.approx(want.tolist(), abs=1e-6)
    assert "scored 2 of 4 row(s)" in capsys.readouterr().err


def test_score_output_is_checked_before_scoring(tiny_dirs, images, rows_file, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    assert main(["score", *_args(tiny_dirs), "--input", str(rows_file), "--output", str(tmp_path / "adir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    existing = tmp_path / "old.jsonl"
    existing.write_text("keep\n")
    assert main(["score", *_args(tiny_dirs), "--input", str(rows_file), "--output", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "keep\n"
    assert main(["score", *_args(tiny_dirs), "--input", str(rows_file), "--output", str(existing),
                 "--overwrite"]) == 0
    assert len(existing.read_text().splitlines()) == 3


def test_cli_speaks_cli(tiny_dirs, images, tmp_path, capsys):
    base, reward = tiny_dirs
    images[0].save(tmp_path / "a.png")
    assert main(["score", *_args(tiny_dirs), "--image", str(tmp_path / "a.png"), "--text", ""]) == 2
    assert "--text is empty" in capsys.readouterr().err
    # a base model given as the checkpoint: say what it is, in CLI terms
    assert main(["score", "--checkpoint", str(base), "--image", str(tmp_path / "a.png"), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "is a base model (qwen2_vl), not a MULTI-TAP checkpoint" in err and "--base-model" in err
    # a hub id offline: one line, no traceback
    assert main(["score", "--checkpoint", "org/not-here", "--image", str(tmp_path / "a.png"), "--text", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available offline" in err[0] and "pass a local directory" in err[0]


def test_presets_lists_weights_and_schemas_with_their_dimensions(capsys):
    assert main(["presets", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["weights"]["ti2t_safety_first"]["safety"] == 2.0
    assert got["schemas"]["accessibility"]["dimensions"] == ["afraidness", "nonactionability", "sufficiency",
                                                              "conciseness"]
    assert "response_1" in got["schemas"]["align-anything-ti2t"]["columns"]
    assert main(["presets"]) == 0
    assert "ti2t_balanced" in capsys.readouterr().out


def test_a_hub_model_in_a_recipe_or_dataset_offline_is_one_line(tmp_path, capsys):
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "stage1" / "tiny_shapes.yaml")
    assert main(["train-stage1", recipe, "model.base_model=some-org/some-model", f"train.output_dir={tmp_path}",
                 "data.dataset_kwargs.n_train=8", "data.dataset_kwargs.n_eval=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available offline" in err[0] and "pass a local directory" in err[0], err
    assert main(["train-stage1", recipe, "data.dataset=some-org/some-data", f"train.output_dir={tmp_path}",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available offline" in err[0], err


def test_commands_print_no_warning_on_a_clean_install(tiny_dirs, images, tmp_path):
    """score and rerank in a fresh interpreter with Python's warnings shown: stderr holds no warning."""
    base, reward = tiny_dirs
    images[0].save(tmp_path / "a.png")
    (tmp_path / "cands.txt").write_text("a red circle\na blue square\n")
    env = {**__import__("os").environ, "PYTHONWARNINGS": "default", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for args in (["score", "--image", str(tmp_path / "a.png"), "--text", "a red circle"],
                 ["rerank", "--image", str(tmp_path / "a.png"), "--candidates", str(tmp_path / "cands.txt")]):
        proc = subprocess.run([sys.executable, "-m", "multitap_rl.cli", *args, "--checkpoint", str(reward),
                               "--base-model", str(base), "--device", "cpu"], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "warn" not in proc.stderr.lower(), proc.stderr


def test_a_bug_keeps_its_traceback_and_user_errors_are_one_line(monkeypatch, capsys):
    from multitap_rl.commands import presets
    from multitap_rl.errors import ConfigError

    def bug(args):
        raise TypeError("a bug in multitap-rl")

    monkeypatch.setattr(presets, "run", bug)
    with pytest.raises(TypeError, match="a bug in multitap-rl"):
        main(["presets"])

    def user_error(args):
        raise ConfigError("weights 'x': no such file or preset")

    monkeypatch.setattr(presets, "run", user_error)
    assert main(["presets"]) == 2
    assert capsys.readouterr().err.strip() == "multitap-rl presets: error: weights 'x': no such file or preset"
