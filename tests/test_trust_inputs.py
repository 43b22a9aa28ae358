"""Inputs found by adversarial testing (issue 22), one class per section, each checked as a class:

1. integer images (PIL ``I``/``I;16*``, TIFFs with 32-bit samples, int arrays and tensors) keep
   their content by the documented integer rule, or are refused naming the range and how to
   convert; a bad ``MULTITAP_MAX_IMAGE_PIXELS`` is a ``ConfigError``;
2. the command line: ``precision`` names a bad row by its input line, ``demo`` checks its output
   directory and arguments before any work, an error starts on a line of its own after a progress
   bar, ``score`` writes nothing to stdout when it fails, ``rerank`` checks weights before loading.
"""

import io
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from multitap_rl import MultiTapModel
from multitap_rl.cli import main
from multitap_rl.errors import ConfigError, SampleError
from multitap_rl.images import load_image, max_image_pixels
from multitap_rl.testing import make_image

# -- 1. integer images: content kept by the integer rule, or refused --------------------------------
RAMP8 = np.arange(256, dtype=np.int64).reshape(16, 16)  # every 8-bit value once
RAMP16 = RAMP8 * 257  # every 8-bit value's 16-bit counterpart, 0 .. 65535
ODD16 = (RAMP8 * 251 + 7) % 65536  # 16-bit values that are not multiples of 257 (rounding matters)


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _scaled16(values: np.ndarray) -> np.ndarray:
    """The documented 16-bit rule, ``round(v * 255 / 65535)``, in exact rational arithmetic."""
    return np.vectorize(lambda v: round(Fraction(int(v) * 255, 65535)))(values)


def _grey(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img).astype(np.int64)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


# every way a user holds integer pixels without stating their bit depth
INTEGER_FORMS = {
    "PIL I (fromarray int32)": lambda a: Image.fromarray(a.astype(np.int32)),
    "PIL I (convert)": lambda a: Image.fromarray(a.astype(np.int32)).convert("I"),
    "PIL I;16 (fromarray uint16)": lambda a: Image.fromarray(a.astype(np.uint16)),
    "PIL I;16B (fromarray >u2)": lambda a: Image.fromarray(a.astype(">u2")),
    "32-bit TIFF": lambda a: _tiff(Image.fromarray(a.astype(np.int32))),
    "int32 array": lambda a: a.astype(np.int32),
    "int64 array": lambda a: a.astype(np.int64),
    "uint16 array": lambda a: a.astype(np.uint16),
    "int16 array": lambda a: a.astype(np.int16),
    "int32 tensor": lambda a: torch.from_numpy(a.astype(np.int32)),
    "int64 tensor": lambda a: torch.from_numpy(a.astype(np.int64)),
    "int64 (H, W, 3) array": lambda a: np.repeat(a[..., None], 3, axis=-1),
    "int32 (3, H, W) tensor": lambda a: torch.from_numpy(np.repeat(a[None], 3, axis=0).astype(np.int32)),
}


@pytest.mark.parametrize("form", sorted(INTEGER_FORMS))
def test_integer_pixels_in_the_8_bit_range_are_kept_as_8_bit(form):
    """What ``Image.fromarray(int32)``, ``.convert("I")`` and many TIFFs hold: 8-bit data, not black."""
    assert (_grey(load_image(INTEGER_FORMS[form](RAMP8), 0)) == RAMP8).all(), form


@pytest.mark.parametrize("form", sorted(f for f in INTEGER_FORMS if "convert" not in f))
@pytest.mark.parametrize("values", [RAMP16, ODD16], ids=["multiples of 257", "odd values"])
def test_integer_pixels_in_the_16_bit_range_scale_by_255_over_65535(form, values):
    if form.startswith("int16") and values.max() >= 2**15:
        values = values // 2  # int16 holds [0, 32767]: still 16-bit data
    assert (_grey(load_image(INTEGER_FORMS[form](values), 0)) == _scaled16(values)).all(), form


@pytest.mark.parametrize("form", sorted(f for f in INTEGER_FORMS if "16" not in f and "convert" not in f))
@pytest.mark.parametrize("values, span", [(RAMP8 - 3, "[-3, 252]"), (RAMP16 + 1, "[1, 65536]"),
                                          (RAMP8 * 2**23, "[0, 2139095040]")])
def test_integer_pixels_outside_16_bits_are_refused_naming_range_and_conversion(form, values, span):
    with pytest.raises(SampleError) as info:
        load_image(INTEGER_FORMS[form](values), 4)
    text = str(info.value)
    assert text.startswith("image 4: ") and info.value.field == "image"
    assert f"values span {span}" in text and "np.clip(a, 0, 255).astype(np.uint8)" in text, text


def test_a_file_declaring_16_bit_samples_scales_by_255_over_65535_whatever_its_values():
    """A 16-bit PNG/TIFF states its depth: a dark one stays dark (not read as 8-bit data)."""
    dark = RAMP8.astype(np.uint16)  # 16-bit values 0..255: at most one 8-bit step above black
    for encoded in (_png(Image.fromarray(dark)), _tiff(Image.fromarray(dark))):
        assert (_grey(load_image(encoded, 0)) == _scaled16(dark)).all()


def test_an_int32_image_of_8_bit_data_scores_as_its_8_bit_image(tiny_model, images):
    rgb = images[0]
    grey = rgb.convert("L")
    as_int = [Image.fromarray(np.asarray(grey).astype(np.int32)), grey.convert("I"),
              np.asarray(rgb).astype(np.int64), torch.from_numpy(np.asarray(rgb).astype(np.int32))]
    want = tiny_model.score([grey, grey, rgb, rgb], ["A red circle."] * 4).overall
    got = tiny_model.score(as_int, ["A red circle."] * 4).overall
    assert torch.equal(got, want)  # the same 8-bit pixels: the same scores, bit for bit


@pytest.mark.parametrize("value", ["abc", "-5", "1e9", "0", "1.5", "10 000", "+5"])
def test_a_bad_max_image_pixels_variable_is_a_config_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("MULTITAP_MAX_IMAGE_PIXELS", value)
    match = f"MULTITAP_MAX_IMAGE_PIXELS={value!r} is not a positive integer"
    with pytest.raises(ConfigError, match=match.replace("+", r"\+").replace(".", r"\.")):
        max_image_pixels()
    with pytest.raises(ConfigError, match="MULTITAP_MAX_IMAGE_PIXELS"):  # not an undecodable image
        load_image(_png(Image.new("L", (4, 4))), 0)


def test_a_good_max_image_pixels_variable_is_the_limit(monkeypatch):
    monkeypatch.setenv("MULTITAP_MAX_IMAGE_PIXELS", " 15 ")
    assert max_image_pixels() == 15
    with pytest.raises(SampleError, match="4x4 = 16 pixels exceeds the limit of 15"):
        load_image(_png(Image.new("L", (4, 4))), 0)
    monkeypatch.setenv("MULTITAP_MAX_IMAGE_PIXELS", "")
    assert max_image_pixels() == 89_478_485  # blank: the default


def test_cli_refuses_a_bad_max_image_pixels_variable_before_loading(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MultiTapModel, "from_spec", _must_not_load)
    monkeypatch.setenv("MULTITAP_MAX_IMAGE_PIXELS", "lots")
    make_image(0).save(tmp_path / "a.png")
    assert main(["score", *_model_args(tiny_dirs), "--image", str(tmp_path / "a.png"), "--text", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["multitap-rl score: error: MULTITAP_MAX_IMAGE_PIXELS='lots' is not a positive integer; set it to "
                   "a number of pixels (e.g. MULTITAP_MAX_IMAGE_PIXELS=200000000) or unset it for the default "
                   "89,478,485"]


# -- 2. the command line ---------------------------------------------------------------------------
def _model_args(tiny_dirs):
    base, reward = tiny_dirs
    return ["--checkpoint", str(reward), "--base-model", str(base), "--device", "cpu"]


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


def _screen_lines(text: str) -> list[str]:
    """What a terminal shows for ``text``: ``\\r`` returns to the line's start and later characters
    overwrite earlier ones (how a progress bar redraws itself)."""
    shown = []
    for raw in text.split("\n"):
        line: list[str] = []
        col = 0
        for ch in raw:
            if ch == "\r":
                col = 0
                continue
            line[col:col + 1] = [ch]
            col += 1
        shown.append("".join(line).rstrip())
    return [s for s in shown if s]


def _rows_with_a_bad_fifth_line(tmp_path) -> str:
    """Rows on lines 1, 2, 4, 5, 6, 7 (line 3 blank); line 5 -- the 4th row -- names a corrupt image."""
    for i in range(2):
        make_image(i).save(tmp_path / f"{i}.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    rows = [{"image": "0.png", "text": "A red circle."}, {"image": "0.png", "text": "A blue square."}, None,
            {"image": "1.png", "text": "A tree."}, {"image": "corrupt.png", "text": "Two dogs."},
            {"image": "1.png", "text": "A cat."}, {"image": "1.png", "text": "A car."}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(("" if r is None else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("batch_size", ["1", "2", "4"])
def test_precision_names_a_bad_row_by_its_input_line(tiny_dirs, tmp_path, capsys, batch_size):
    path = _rows_with_a_bad_fifth_line(tmp_path)
    assert main(["precision", *_model_args(tiny_dirs), "--input", path, "--group-size", "2",
                 "--batch-size", batch_size]) == 2
    err = _screen_lines(capsys.readouterr().err)
    assert err[-1].startswith(f"multitap-rl precision: error: {path}: line 5: image: cannot decode file"), err


def test_compare_precision_names_a_bad_sample_by_its_position_not_its_batch_index(tiny_dirs):
    from multitap_rl.precision import compare_precision

    base, reward = tiny_dirs
    samples = [make_image(0), make_image(1), make_image(2), b"not an image"]
    with pytest.raises(SampleError) as info:
        compare_precision(reward, samples, ["a", "b", "c", "d"], base_model=base, device="cpu", group_size=2,
                          batch_size=2)
    assert info.value.index == 3 and str(info.value).startswith("image 3: cannot decode bytes")


@pytest.fixture()
def no_training(monkeypatch):
    """The offline world fails loudly if it starts: argument errors must come first."""
    import multitap_rl.world as world

    def train(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(world, "run_captioner_world", train)


def test_demo_refuses_an_output_dir_under_a_file_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--output-dir", str(tmp_path / "file" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output-dir" in err[0] and "cannot create it or write there" in err[0], err
    assert main(["demo", "--output-dir", str(tmp_path / "file"), "--no-progress"]) == 2
    assert "is a file; pass a directory" in capsys.readouterr().err


def test_demo_refuses_an_unwritable_output_dir_before_training(tmp_path, capsys, no_training, monkeypatch):
    """The staging folder is what finds it (a chmod-ed folder is writable to root, so creating it
    is made to fail the way a read-only file system fails it)."""
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["demo", "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "Permission denied" in err


def test_a_failed_staged_output_leaves_no_folder_behind(tmp_path):
    from multitap_rl.commands._common import staged_output

    with pytest.raises(RuntimeError), staged_output(tmp_path / "a" / "b", overwrite=False, what="--output-dir",
                                                    marker="report.json") as stage:
        (stage / "report.json").write_text("{}")
        raise RuntimeError("the run failed")
    assert not (tmp_path / "a" / "b").exists()


@pytest.mark.parametrize("extra, match", [
    (["--seed", "-1"], r"seed must be an int in \[0, 4294967295\], got -1"),
    (["--grpo-steps", "-2"], "grpo_steps must be an int >= 0, got -2"),
    (["--warm-steps", "-1"], "warm_steps must be an int >= 0"),
    (["--device", "cuda"], "--device need.* --checkpoint"),
    (["--heads", "h", "--dtype", "bf16"], "--heads, --dtype need.* --checkpoint"),
    (["--steering", "--steer-weights", ";"], "--steering needs at least one weighting"),
    (["--steering", "--steer-weights", "color=1;shape=x"], "shape=x"),
])
def test_demo_checks_every_argument_before_training_and_before_creating_the_output(tmp_path, capsys, no_training,
                                                                                   extra, match):
    assert main(["demo", "--output-dir", str(tmp_path / "out"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and __import__("re").search(match, err[0]), err
    assert not (tmp_path / "out").exists()


def test_demo_with_a_checkpoint_checks_arguments_before_loading(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(MultiTapModel, "from_pretrained", _must_not_load)
    base, reward = tiny_dirs
    common = ["demo", "--checkpoint", str(reward), "--base-model", str(base), "--no-progress"]
    for extra, match in ([["--images", str(tmp_path / "nope.png")], "--images: file(s) not found"],
                         [["--grpo-steps", "-1"], "--grpo-steps must be >= 0"],
                         [["--seed", "-3"], "--seed must be an int"],
                         [["--weights", "overall=lots"], "overall=lots"]):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_world_config_refuses_bools_non_finite_rates_and_empty_prompts():
    from multitap_rl.world import CaptionerWorldConfig

    for bad, match in (({"grpo_steps": True}, "grpo_steps must be an int"),
                       ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
                       ({"warm_lr": 0.0}, "warm_lr must be a finite number > 0"),
                       ({"beta": float("inf")}, "beta must be a finite number >= 0"),
                       ({"min_p": 1.5}, r"min_p must lie in \[0, 1\)"),
                       ({"malformed": float("nan")}, r"malformed must lie in \[0, 1\)"),
                       ({"prompt": " "}, "prompt must be a non-empty string"),
                       ({"seed": 2**32}, "seed must be an int"),
                       ({"steering": "color=1"}, "steering must be a tuple of strings")):
        with pytest.raises(ConfigError, match=match):
            CaptionerWorldConfig(**bad)


@pytest.mark.parametrize("leave", [True, False], ids=["kept bar", "transient bar"])
def test_an_error_after_a_progress_bar_starts_on_its_own_line(monkeypatch, capsys, leave):
    import sys

    from tqdm.auto import tqdm

    from multitap_rl.commands import presets

    def fails_mid_way(args):
        bar = tqdm(total=4, desc="working", file=sys.stderr, leave=leave, mininterval=0)
        bar.update(2)
        raise ConfigError("boom")

    monkeypatch.setattr(presets, "run", fails_mid_way)
    assert main(["presets"]) == 2
    shown = _screen_lines(capsys.readouterr().err)
    assert shown[-1] == "multitap-rl presets: error: boom", shown


def test_score_writes_nothing_to_stdout_when_it_fails_mid_way(tiny_dirs, tmp_path, capsys):
    path = _rows_with_a_bad_fifth_line(tmp_path)
    assert main(["score", *_model_args(tiny_dirs), "--input", path, "--batch-size", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # rows 1-3 were scored, but none reaches stdout
    shown = _screen_lines(captured.err)
    assert shown[-1].startswith(f"multitap-rl score: error: {path}: line 5: image: cannot decode"), shown
    assert main(["score", *_model_args(tiny_dirs), "--input", path, "--batch-size", "1", "--on-invalid", "skip"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and "error" in rows[3]["multitap"] and "overall" in rows[5]["multitap"]


@pytest.mark.parametrize("weights, match", [("safety=1", r"unknown dimension\(s\) \['safety'\]"),
                                            ("overall=x", "overall=x"),
                                            ("no_such_preset", "no such file or preset")])
def test_rerank_checks_weights_before_the_model_loads(tiny_dirs, tmp_path, capsys, monkeypatch, weights, match):
    monkeypatch.setattr(MultiTapModel, "from_spec", _must_not_load)
    monkeypatch.setattr(MultiTapModel, "from_pretrained", _must_not_load)
    make_image(0).save(tmp_path / "a.png")
    (tmp_path / "cands.txt").write_text("a red circle\na blue square\n")
    assert main(["rerank", *_model_args(tiny_dirs), "--image", str(tmp_path / "a.png"), "--candidates",
                 str(tmp_path / "cands.txt"), "--weights", weights]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and __import__("re").search(match, err[0]), err
