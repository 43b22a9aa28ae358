"""Property-based: random image modes, sizes and dtypes and random unicode texts (the chat
template's special tokens included) give nothing but valid scores and SampleErrors -- never a
NaN, never a crash deep in torch or PIL; and every image mode or dtype a user can produce either
loads with its content kept (never a constant image from a varying one) or is a SampleError, and
only where the documented rules refuse it."""

import math
import os

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from multitap_rl import MultiTapModel  # noqa: E402
from multitap_rl.errors import SampleError  # noqa: E402
from multitap_rl.images import load_image  # noqa: E402
from multitap_rl.testing import QWEN_SPECIAL_TOKENS  # noqa: E402

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV", "LAB"]


def _examples(default: int) -> int:
    return int(os.environ.get("FUZZ_EXAMPLES", str(default)))


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["pil", "array", "tensor", "bytes", "none", "path"]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "pil":
        mode = draw(st.sampled_from(MODES))
        if mode in ("I", "I;16", "F"):
            dtype = {"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode]
            hi = {"I": draw(st.sampled_from([255, 65535, 2**31 - 1])), "I;16": draw(st.sampled_from([255, 65535])),
                  "F": draw(st.sampled_from([1.0, 255.0, 1e6]))}[mode]
            arr = (rng.random((h, w)) * hi).astype(dtype)
            if mode == "I" and draw(st.booleans()):
                arr[0, 0] = -draw(st.sampled_from([1, 2**31]))
            if mode == "F" and draw(st.booleans()):
                arr[0, 0] = draw(st.sampled_from([math.nan, math.inf, -1.0]))
            return Image.fromarray(arr, mode=mode if mode != "I;16" else None)
        return Image.new(mode, (w, h), draw(st.integers(0, 255)))
    if kind == "array":
        dtype = draw(st.sampled_from([np.uint8, np.int16, np.int32, np.int64, np.uint16, np.float32, np.float64,
                                      np.bool_]))
        shape = draw(st.sampled_from([(h, w, 3), (h, w), (3, h, w), (h, w, 4), (h, w, 2), (0, w, 3)]))
        scale = draw(st.sampled_from([1.0, 255.0, 300.0, 65535.0, 2.0**31 - 1, -300.0]))
        return (rng.random(shape) * scale).astype(dtype)
    if kind == "tensor":
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, torch.float64, torch.int32,
                                      torch.int64]))
        t = torch.from_numpy(rng.random((3, h, w)))
        if dtype in (torch.int32, torch.int64):
            return (t * draw(st.sampled_from([255, 65535, 2**31 - 1, -255]))).to(dtype)
        return (t * (255 if dtype == torch.uint8 else draw(st.sampled_from([1.0, 2.0])))).to(dtype)
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "path":
        return draw(st.sampled_from(["/no/such.png", "", "."]))
    return None


# -- every mode and dtype a user can produce: content kept, or a SampleError the rules call for ---------
# Each draw is a varying image whose variation survives 8 bits (it holds both ends of its range, in
# a channel RGB keeps), plus whether the documented rules (multitap_rl.images) refuse it.
INT_RANGES = {"8-bit": (0, 255, False), "16-bit": (0, 65535, False), "negative": (-(2**31), 255, True),
              "above 16 bits": (0, 2**31 - 1, True)}
INT_DTYPES = {"int16": (np.int16, ("8-bit",)), "uint16": (np.uint16, ("8-bit", "16-bit")),
              "int32": (np.int32, tuple(INT_RANGES)), "int64": (np.int64, tuple(INT_RANGES))}


def _varying(rng, shape, lo: int, hi: int) -> np.ndarray:
    """Random integers in [lo, hi] holding both ``lo`` and ``hi``."""
    a = rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64)
    a.flat[0], a.flat[-1] = lo, hi
    return a


@st.composite
def user_images(draw):
    """(image as a user holds it, may the rules refuse it)."""
    w, h = draw(st.integers(2, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    form = draw(st.sampled_from(["I", "I;16", "I;16B", "F", "L", "LA", "P", "RGBA", "CMYK", "1", "array", "tensor"]))
    if form in ("I", "I;16", "I;16B"):
        name = draw(st.sampled_from(tuple(INT_RANGES) if form == "I" else ("8-bit", "16-bit")))
        lo, hi, refuse = INT_RANGES[name]
        dtype = {"I": np.int32, "I;16": np.uint16, "I;16B": ">u2"}[form]
        return Image.fromarray(_varying(rng, (h, w), lo, hi).astype(dtype)), refuse
    if form in ("array", "tensor"):
        dtype, names = INT_DTYPES[draw(st.sampled_from(sorted(INT_DTYPES)))]
        name = draw(st.sampled_from(names))
        lo, hi, refuse = INT_RANGES[name]
        shape = draw(st.sampled_from([(h, w), (h, w, 3), (3, h, w), (h, w, 4)]))
        arr = _varying(rng, shape, lo, hi).astype(dtype)
        if form == "tensor" and dtype != np.uint16:
            return torch.from_numpy(arr), refuse
        return arr, refuse
    if form == "F":
        top = draw(st.sampled_from([1.0, 255.0, 1e6, -1.0]))
        arr = rng.random((h, w)) * abs(top)
        arr.flat[0], arr.flat[-1] = min(0.0, top), abs(top)
        return Image.fromarray(arr.astype(np.float32)), not 0.0 <= top <= 255.0
    if form == "1":
        bits = rng.random((h, w)) < 0.5
        bits.flat[0], bits.flat[-1] = False, True
        return Image.fromarray(bits), False
    grey = _varying(rng, (h, w), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 255, size=(h, w), endpoint=True).astype(np.uint8)
    if form == "L":
        return Image.fromarray(grey), False
    if form == "LA":
        return Image.fromarray(np.stack([grey, noise], axis=-1), mode="LA"), False
    if form == "P":
        img = Image.fromarray(grey).convert("P")
        img.putdata(grey.ravel().tolist())
        img.putpalette([v for i in range(256) for v in (i, i, i)])  # index i shows grey i
        return img, False
    if form == "RGBA":
        return Image.fromarray(np.stack([grey, noise, grey, noise], axis=-1), mode="RGBA"), False
    zero = np.zeros_like(grey)  # CMYK: the cyan channel varies, no black (K would darken it all)
    return Image.fromarray(np.stack([grey, noise, noise, zero], axis=-1), mode="CMYK"), False


@settings(max_examples=_examples(300), deadline=None)
@given(case=user_images())
def test_every_mode_and_dtype_keeps_its_content_or_is_a_sample_error(case):
    obj, may_refuse = case
    try:
        img = load_image(obj, 5)
    except SampleError as exc:
        assert may_refuse, f"refused an image the rules accept: {exc}"
        assert exc.index == 5 and exc.field == "image"
        return
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3
    assert int(arr.max()) > int(arr.min()), "a varying image came out constant: its content was lost"


texts = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(QWEN_SPECIAL_TOKENS)), min_size=1, max_size=4).map(
    lambda parts: " ".join(parts))


@pytest.fixture(scope="module", params=[28, None], ids=["resized", "unresized"])
def model(tiny_dirs, request):
    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=request.param)


@settings(max_examples=_examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(images(), texts), min_size=1, max_size=3))
def test_random_inputs_give_valid_scores_or_sample_errors(model, batch):
    imgs, txts = [b[0] for b in batch], [b[1] for b in batch]
    out = model.score(imgs, txts, on_invalid="skip")
    assert len(out) == len(batch)
    for i in range(len(batch)):
        if i in out.errors:
            assert isinstance(out.errors[i], SampleError) and out.errors[i].index == i
            assert math.isnan(float(out.overall[i]))
        else:
            assert 0.0 < float(out.overall[i]) < 1.0
    try:
        strict = model.score(imgs, txts)
    except SampleError as exc:
        assert exc.index in out.errors  # raising mode stops at a sample the skipping mode reported
    else:
        assert not out.errors and torch.equal(strict.overall, out.overall)


@settings(max_examples=_examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(images(), st.one_of(texts, st.none(), st.integers())), min_size=1, max_size=3))
def test_trl_reward_gives_a_float_or_none_per_completion(model, batch):
    from reward_fns import multitap_reward

    reward = multitap_reward(model)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    out = reward(prompts=[prompt] * len(batch), completions=[b[1] for b in batch], image=[b[0] for b in batch])
    assert len(out) == len(batch)
    assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in out)
