"""No silent wrong scores, no lost rows, clear errors, bounded memory: one test per class of problem.

Silent wrong results first (identity-keyed caches, resume over changed data, image modes,
non-finite numbers), then per-sample isolation in the reward adapters, then errors that must name
the right sample and file, then memory and lifetime."""

import gc
import io
import json
import math
import threading
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from multitap_rl import MultiTapModel
from multitap_rl.errors import CheckpointError, ConfigError, DataError, HeadsError, SampleError
from multitap_rl.images import load_image, set_max_image_pixels
from reward_fns import multitap_objective_rewards, multitap_reward

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


@pytest.fixture(scope="module")
def small(tiny_dirs):
    """The tiny model at 56 px (fast)."""
    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=56)


# -- 1. identity-keyed caches ----------------------------------------------------------------------
class FreshArrays:
    """A column that builds a new array on every access (as ``datasets`` does with a numpy format):
    a freed array's id is reused by the next one at once."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        return np.array(self.arrays[i], copy=True)


def test_a_freed_objects_id_never_returns_another_images_score(small, images):
    arrays = [np.asarray(im.resize((56, 56))) for im in images]
    texts = ["A red circle."] * 4
    fresh = small.score(FreshArrays(arrays), texts).overall
    expected = small.score([arrays[i] for i in range(4)], texts).overall
    assert torch.allclose(fresh, expected, atol=1e-6)
    assert len(set(np.round(expected.tolist(), 6))) == 4  # four different images, four different scores


def test_datasets_numpy_column_scores_each_row(small, images):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [im.resize((56, 56)) for im in images]})  # an Image column
    col = ds.with_format("numpy")["image"]  # fresh uint8 arrays on every access
    got = small.score(col, ["A red circle."] * 4).overall
    want = small.score([np.asarray(im.resize((56, 56))) for im in images], ["A red circle."] * 4).overall
    assert torch.allclose(got, want, atol=1e-6)


# -- 2. the reward's batch cache is keyed by content ----------------------------------------------------
def test_reward_cache_is_keyed_by_content_not_by_list_identity(small, images):
    r = multitap_reward(small)
    prompts, completions = [PROMPT] * 2, ["A red circle.", "A tree."]
    first = r(prompts=prompts, completions=completions, image=[images[0], images[1]])
    other = r(prompts=prompts, completions=completions, image=[images[2], images[3]])  # same list objects
    assert other == pytest.approx(small.score(images[2:4], completions).overall.tolist(), abs=1e-6)
    assert other != pytest.approx(first, abs=1e-6)
    completions[1] = "Two dogs."  # edited in place
    edited = r(prompts=prompts, completions=completions, image=[images[2], images[3]])
    assert edited == pytest.approx(small.score(images[2:4], completions).overall.tolist(), abs=1e-6)


def test_threads_sharing_list_objects_get_their_own_rewards(small, images):
    objective = multitap_objective_rewards(small)[0]
    prompts, completions = [PROMPT] * 2, ["A red circle.", "A tree."]
    want = {k: small.score([images[k], images[(k + 1) % 4]], completions).overall.tolist() for k in range(4)}
    got, errors = {}, []

    def work(k):
        try:
            for _ in range(3):
                got[k] = objective(prompts=prompts, completions=completions, image=[images[k], images[(k + 1) % 4]])
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(4):
        assert got[k] == pytest.approx(want[k], abs=1e-6)


# -- 3. extraction resumes only into the same input --------------------------------------------------------
def test_extract_refuses_to_resume_into_reordered_rows(small, images, tmp_path):
    from multitap_rl.training.features import extract_features, load_features

    rows = []
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"caption {i}", "id": i})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stop = []

    def interrupt(k):
        stop.append(k)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(small, data, tmp_path / "s", chunk_size=2, progress=False, on_chunk=interrupt)
    data.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # same file, rows reordered
    with pytest.raises(DataError, match="different input or model .*data"):
        extract_features(small, data, tmp_path / "s", chunk_size=2, progress=False)
    out = extract_features(small, data, tmp_path / "s", chunk_size=2, progress=False, overwrite=True)
    assert len(load_features(out)) == 4


# -- 5. image modes: scaled by their range, never saturated --------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


RAMP = np.linspace(0.0, 1.0, 64 * 64).reshape(64, 64)


@pytest.mark.parametrize("name, encoded", [
    ("16-bit grey PNG", lambda: _png(Image.fromarray((RAMP * 65535).round().astype(np.uint16)))),
    ("32-bit integer TIFF of 16-bit data", lambda: _tiff(Image.fromarray((RAMP * 65535).round().astype(np.int32)))),
    ("32-bit float TIFF in [0, 1]", lambda: _tiff(Image.fromarray(RAMP.astype(np.float32)))),
])
def test_high_bit_depth_images_scale_by_their_range(name, encoded):
    got = np.asarray(load_image(encoded(), 0)).astype(int)
    want = (RAMP * 255).round().astype(int)
    assert got.shape == (64, 64, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0] - want).max() <= 1, name  # one 8-bit step of rounding, not saturation
    assert got.min() == 0 and got.max() == 255


def test_float_image_out_of_range_is_a_sample_error():
    img = Image.fromarray((RAMP * 1000).astype(np.float32))
    with pytest.raises(SampleError, match=r"image 2: float image values span \[0, 1000\]"):
        load_image(img, 2)


def test_decompression_bomb_is_a_sample_error():
    data = _png(Image.new("L", (200, 100)))
    set_max_image_pixels(10_000)
    try:
        with pytest.raises(SampleError, match=r"image 1: bytes: 200x100 = 20,000 pixels exceeds the limit"):
            load_image(data, 1)
    finally:
        set_max_image_pixels(None)
    assert load_image(data, 1).size == (200, 100)


def test_extreme_aspect_ratio_without_resize_and_a_zero_image_size(tiny_dirs, images):
    base, reward = tiny_dirs
    keep = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=None)
    strip = Image.new("RGB", (3000, 10), (200, 10, 10))
    with pytest.raises(SampleError, match=r"image 1: 3000x10 has an aspect ratio above 200"):
        keep.score([images[0], strip], ["a", "b"])
    with pytest.raises(ConfigError, match="image_size must be a positive int or None"):
        MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=0)


# -- 6. non-finite and wrong-typed numbers ------------------------------------------------------------
def _copy_checkpoint(src, dst, change):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            state = load_file(str(f))
            save_file({k: change(k, v) for k, v in state.items()}, str(dst / f.name), metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("change, match", [
    (lambda k, v: v.clone().fill_(math.nan) if k.endswith("norm.weight") else v, "NaN or infinite"),
    (lambda k, v: torch.full_like(v, math.inf) if k == "reward_head.bias" else v, "reward_head.bias.* NaN or inf"),
    (lambda k, v: v.to(torch.int32) if k == "reward_head.weight" else v, "reward_head.weight.* dtype int32"),
])
def test_non_finite_or_integer_checkpoint_tensors_are_refused_by_name(tiny_dirs, tmp_path, change, match):
    base, reward = tiny_dirs
    bad = _copy_checkpoint(reward, tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=match):
        MultiTapModel.from_pretrained(bad, base_model=base, device="cpu")


def test_heads_files_with_bad_numbers_or_fields_are_refused(small, images, tmp_path):
    from safetensors.torch import load_file, save_file

    from multitap_rl.heads import RidgeHeads
    from multitap_rl.training.ridge import fit_ridge_heads

    feats = small.features([images[i % 4] for i in range(8)], [f"caption {i}" for i in range(8)])
    heads = fit_ridge_heads(feats, {"a": torch.arange(8.0)})
    good = heads.save(tmp_path / "good")
    cases = {
        "nan coef": ({"coef": lambda t: t.clone().fill_(math.nan)}, {}, "tensor 'coef' holds NaN"),
        "int coef": ({"coef": lambda t: t.to(torch.int64)}, {}, "tensor 'coef' has dtype torch.int64"),
        "nan stats": ({}, {"stats": {"a": [math.nan, 1.0]}}, r"stats\['a'\].*must be finite"),
        "zero std": ({}, {"stats": {"a": [0.0, 0.0]}}, r"stats\['a'\].*std finite and > 0"),
        "hidden str": ({}, {"hidden_size": "64"}, "'hidden_size' must be an integer"),
        "version str": ({}, {"version": "x"}, "'version' must be an integer"),
        "names str": ({}, {"names": "a"}, "'names' must be a list"),
    }
    for name, (tensors, fields, match) in cases.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        state = load_file(str(good / "heads.safetensors"))
        save_file({k: tensors.get(k, lambda t: t)(v) for k, v in state.items()}, str(d / "heads.safetensors"))
        cfg = json.loads((good / "heads.json").read_text())
        cfg.update(fields)
        (d / "heads.json").write_text(json.dumps(cfg))
        with pytest.raises(HeadsError, match=match):
            RidgeHeads.load(d)


def test_ridge_fit_on_non_finite_or_overflowing_targets_is_a_clear_error(small, images):
    from multitap_rl.training.ridge import fit_ridge_heads

    feats = small.features([images[i % 4] for i in range(8)], [f"caption {i}" for i in range(8)])
    with pytest.raises(HeadsError, match="target 'a' is infinite at row 3"):
        fit_ridge_heads(feats, {"a": [0, 1, 2, math.inf, 4, 5, 6, 7]})
    with pytest.raises(HeadsError, match="target 'a' is too large to fit at row 2"):
        fit_ridge_heads(feats, {"a": [0, 1, 1e200, 3, 4, 5, 6, 7]})


def test_score_never_returns_a_silent_nan(small, images):
    """A non-finite feature (here: forced) is the sample's error, raised or reported, never a NaN."""
    engine = small.engine
    real = engine.features

    def features(*args, **kwargs):
        h = real(*args, **kwargs)
        h[1, 0] = math.nan
        return h

    engine.features = features
    try:
        with pytest.raises(SampleError, match=r"score 1: features not finite"):
            small.score(images[:3], ["a", "b", "c"])
        out = small.score(images[:3], ["a", "b", "c"], on_invalid="skip")
        assert list(out.errors) == [1] and out.valid.tolist() == [True, False, True]
        assert math.isnan(float(out.overall[1])) and torch.isfinite(out.overall[[0, 2]]).all()
    finally:
        engine.features = real


# -- 7. per-sample isolation in the reward adapters ----------------------------------------------------
def test_one_bad_completion_is_that_completions_problem(small, images, caplog):
    logged = {}
    r = multitap_reward(small)
    bad_png = b"\x89PNG not really"
    completions = ["A red circle.", "a <|image_pad|> caption", "A tree.", "A dog."]
    with caplog.at_level("WARNING", logger="reward_fns.core"):
        out = r(prompts=[PROMPT] * 4, completions=completions, image=[images[0], images[1], bad_png, images[3]],
                log_metric=lambda k, v: logged.__setitem__(k, v))
        r(prompts=[PROMPT] * 4, completions=completions, image=[images[0], images[1], bad_png, images[3]])
    assert out[1] is None and out[2] is None
    want = small.score([images[0], images[3]], ["A red circle.", "A dog."]).overall.tolist()
    assert [out[0], out[3]] == pytest.approx(want, abs=1e-6)  # the others scored exactly as alone
    assert logged["multitap/invalid"] == 2.0
    assert sum("could not be scored" in m for m in caplog.messages) == 1  # warned once
    floor = multitap_reward(small, on_invalid=-1.0)
    assert floor(prompts=[PROMPT] * 2, completions=completions[:2], image=images[:2])[1] == -1.0
    strict = multitap_reward(small, on_invalid="raise")
    with pytest.raises(SampleError, match=r"completion 2: image: cannot decode bytes"):
        strict(prompts=[PROMPT] * 3, completions=["a", "b", "c"], image=[images[0], images[1], bad_png])


def test_errors_name_the_original_completion(small, images):
    strict = multitap_reward(small, on_invalid="raise")
    with pytest.raises(SampleError, match=r"completion 0: image: missing"):
        strict(prompts=[PROMPT] * 3, completions=["a", "b", "c"], image=[None, images[1], b"bad"])
    relaxed = multitap_reward(small, on_invalid="raise")
    with pytest.raises(SampleError, match=r"completion 2: image: cannot decode"):
        relaxed(prompts=[PROMPT] * 3, completions=["a", "b", "c"], image=[images[0], images[1], b"bad"])
    instruct = multitap_reward(small, task="instruction", on_invalid="raise")
    prompts = [[{"role": "user", "content": "What is it?"}], [{"role": "user", "content": "Who \ud800?"}]]
    with pytest.raises(SampleError, match=r"completion 1: question: not valid Unicode"):
        instruct(prompts=prompts, completions=["a", "b"], image=images[:2])


def test_special_tokens_inside_valid_texts_are_tokenised_as_the_reference_does(small, images):
    """A caption holding a chat-template special token (not the image placeholder) is scored, with
    the token tokenised as the special token, as the reference's tokenizer call does."""
    tok = small.backbone.tokenizer
    ids = small.backbone.tokenize("a <|im_end|> b", None, small.backbone.prepare_image(images[0].convert("RGB"))).ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids[-6:]
    out = small.score(images[:1], ["a <|im_end|> b"])
    assert torch.isfinite(out.overall).all()


# -- raw or misleading errors ---------------------------------------------------------------------------
def test_corrupt_multitap_config_and_shard_index_outside_the_folder(tiny_dirs, tmp_path):
    base, reward = tiny_dirs
    for name, content, match in [("json", "{not json", "multitap_config.json: not valid JSON"),
                                 ("list", "[1, 2]", "expected a JSON object, got list")]:
        d = _copy_checkpoint(reward, tmp_path / name, lambda k, v: v)
        (d / "multitap_config.json").write_text(content)
        with pytest.raises(CheckpointError, match=match):
            MultiTapModel.from_pretrained(d, base_model=base, device="cpu")
    d = _copy_checkpoint(reward, tmp_path / "escape", lambda k, v: v)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lies outside the checkpoint folder"):
        MultiTapModel.from_pretrained(d, base_model=base, device="cpu")


def test_base_model_without_tokenizer_files_and_a_missing_gpu(tiny_dirs, tmp_path):
    base, reward = tiny_dirs
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in base.iterdir():
        if not f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer"):
        MultiTapModel.from_pretrained(reward, base_model=bare, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            MultiTapModel.from_pretrained(reward, base_model=base, device="cuda")


def test_weights_yaml_gates_and_rerank_arguments_say_what_is_wrong(small, images, tmp_path):
    from multitap_rl.combiner import RewardCombiner
    from reward_fns import rerank

    bad = tmp_path / "w.yaml"
    bad.write_text("weights: {overall: [1,\n")
    with pytest.raises(ConfigError, match="w.yaml: not valid YAML"):
        RewardCombiner(bad)
    one = RewardCombiner("overall=1", ["overall", "safety"], gates="safety<0.5:cap=0")  # one gate as a string
    assert len(one.gates) == 1 and one.gates[0].dim == "safety"
    with pytest.raises(TypeError, match="candidates must be a list"):
        rerank(small, images[:1], "abc")
    with pytest.raises(TypeError, match="image 0: candidates must be a list of strings"):
        rerank(small, images[:1], ["abc"])


def test_latin1_jsonl_names_the_file_and_line(tmp_path):
    from multitap_rl.data.rows import read_json_rows

    p = tmp_path / "rows.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: not UTF-8"):
        read_json_rows(p)


def test_fit_heads_out_of_an_existing_file_or_folder(tmp_path, capsys):
    from multitap_rl.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["fit-heads", "--features", str(tmp_path), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "heads.json").write_text("{}")
    assert main(["fit-heads", "--features", str(tmp_path), "--out", str(tmp_path / "heads")]) == 2
    assert "--overwrite" in capsys.readouterr().err


# -- memory and lifetime -----------------------------------------------------------------------------------
def test_prepared_pixels_are_bounded_by_a_chunk(tiny_dirs, images):
    """One call over many distinct images holds at most ``max_images_per_chunk`` prepared images."""
    from multitap_rl import EngineConfig

    base, reward = tiny_dirs
    model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=56,
                                          engine=EngineConfig(max_images_per_chunk=3))
    bb = model.backbone
    live, peak = [], [0]
    real = bb.prepare_image

    def counting(pil):
        out = real(pil)
        live.append(weakref.ref(out))
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in live))
        return out

    bb.prepare_image = counting
    try:
        many = [Image.new("RGB", (40, 40), (i * 20, 255 - i * 20, 7 * i)) for i in range(10)]
        got = model.score(many, ["a shape"] * 10).overall
    finally:
        del bb.prepare_image
    assert peak[0] <= 3  # never more than one chunk of prepared images alive
    alone = torch.cat([model.score([m], ["a shape"]).overall for m in many])
    assert torch.allclose(got, alone, atol=1e-6)  # the same numbers as without chunking


def test_a_reward_does_not_keep_a_deleted_model_alive(tiny_dirs, images):
    base, reward = tiny_dirs
    model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=56)
    fn = multitap_reward(model)
    assert fn(prompts=[PROMPT], completions=["a"], image=images[:1])[0] is not None
    ref = weakref.ref(model)
    del model, fn
    gc.collect()
    assert ref() is None
