"""The CLI: score single pairs and JSONL files; bad input exits non-zero naming the row."""

import json
import subprocess
import sys

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
    lib = tiny_model.score(images[:2], ["A red circle.", "Two dogs."]).overall
    assert abs(got[0]["overall"] - float(lib[0])) < 1e-6 and abs(got[1]["overall"] - float(lib[1])) < 1e-6
    q = tiny_model.score(images[2:3], ["A tree."], ["What is shown?"]).overall
    assert abs(got[2]["overall"] - float(q[0])) < 1e-6
    assert "scoring" in capsys.readouterr().err  # progress bar on stderr


def test_score_single_pair_to_stdout(tiny_dirs, tiny_model, images, tmp_path, capsys):
    images[0].save(tmp_path / "a.png")
    assert main(["score", *_args(tiny_dirs), "--image", str(tmp_path / "a.png"), "--text", "A red circle."]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert abs(record["overall"] - float(tiny_model.score(images[:1], ["A red circle."]).overall[0])) < 1e-6


@pytest.mark.parametrize(
    "row, match",
    [
        ({"image": "missing.png", "text": "x"}, "row 2: image file not found"),
        ({"image": "im0.png"}, "row 2: missing field 'text'"),
        ({"image": "im0.png", "text": " "}, "row 2: empty or non-string 'text'"),
        ({"image": "corrupt.png", "text": "x"}, "row 2: image: cannot decode file"),
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
            assert (tmp_path / "a" / sub / f).read_bytes() == (tmp_path / "b" / sub / f).read_bytes(), f
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


@pytest.mark.integration
def test_demo_runs_end_to_end_offline(capsys):
    import re

    assert main(["demo", "--grpo-steps", "1"]) == 0
    out = capsys.readouterr().out
    mse, baseline = map(float, re.search(r"validation MSE ([\d.]+) vs ([\d.]+)", out).groups())
    assert mse < 0.1 * baseline  # stage 1 learned the colour task
    assert "fitted stage-2 heads ['color', 'shape', 'position']" in out
    assert "weights overall=1,color=1,shape=1,position=1" in out
    rankings = re.findall(r"  image \d+:\n((?:    \d\. .*\n)+)", out)
    assert len(rankings) == 3  # a ranking per image
    # the trained judge ranks the caption with the wrong colour last (scenes: red, blue, green)
    for ranking, colour in zip(rankings, ["red", "blue", "green"]):
        lines = ranking.strip().splitlines()
        assert sum(f"'a {colour} " not in line for line in lines) == 1, ranking  # one wrong-colour caption
        assert f"'a {colour} " not in lines[-1], ranking
    assert "[4/4] GRPO: 1 steps against the weighted reward" in out


def test_score_image_size_and_max_length_options(tiny_dirs, images, tmp_path, capsys):
    from multitap_rl import MultiTapModel

    base, reward = tiny_dirs
    images[0].save(tmp_path / "a.png")
    assert main(["score", *_args(tiny_dirs), "--image", str(tmp_path / "a.png"), "--text", "A red circle.",
                 "--image-size", "112", "--max-length", "none"]) == 0
    got = json.loads(capsys.readouterr().out.strip())["overall"]
    small = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112, max_length=None)
    assert got == pytest.approx(float(small.score(images[:1], ["A red circle."]).overall[0]), abs=1e-6)
    with pytest.raises(SystemExit):
        main(["score", *_args(tiny_dirs), "--image", "x", "--text", "y", "--image-size", "0"])
