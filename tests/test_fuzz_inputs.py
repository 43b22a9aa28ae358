"""Property-based: random image modes, sizes and dtypes and random unicode texts (the chat
template's special tokens included) give nothing but valid scores and SampleErrors -- never a
NaN, never a crash deep in torch or PIL."""

import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from multitap_rl import MultiTapModel  # noqa: E402
from multitap_rl.errors import SampleError  # noqa: E402
from multitap_rl.testing import QWEN_SPECIAL_TOKENS  # noqa: E402

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV", "LAB"]


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
            hi = {"I": 2**31 - 1, "I;16": 65535, "F": draw(st.sampled_from([1.0, 255.0, 1e6]))}[mode]
            arr = (rng.random((h, w)) * hi).astype(dtype)
            if mode == "F" and draw(st.booleans()):
                arr[0, 0] = draw(st.sampled_from([math.nan, math.inf, -1.0]))
            return Image.fromarray(arr, mode=mode if mode != "I;16" else None)
        return Image.new(mode, (w, h), draw(st.integers(0, 255)))
    if kind == "array":
        dtype = draw(st.sampled_from([np.uint8, np.int16, np.int64, np.float32, np.float64, np.bool_]))
        shape = draw(st.sampled_from([(h, w, 3), (h, w), (3, h, w), (h, w, 4), (h, w, 2), (0, w, 3)]))
        scale = draw(st.sampled_from([1.0, 255.0, 300.0]))
        return (rng.random(shape) * scale).astype(dtype)
    if kind == "tensor":
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, torch.float64]))
        t = torch.from_numpy(rng.random((3, h, w)))
        return (t * (255 if dtype == torch.uint8 else draw(st.sampled_from([1.0, 2.0])))).to(dtype)
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "path":
        return draw(st.sampled_from(["/no/such.png", "", "."]))
    return None


texts = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(QWEN_SPECIAL_TOKENS)), min_size=1, max_size=4).map(
    lambda parts: " ".join(parts))


@pytest.fixture(scope="module", params=[28, None], ids=["resized", "unresized"])
def model(tiny_dirs, request):
    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=request.param)


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
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


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(images(), st.one_of(texts, st.none(), st.integers())), min_size=1, max_size=3))
def test_trl_reward_gives_a_float_or_none_per_completion(model, batch):
    from reward_fns import multitap_reward

    reward = multitap_reward(model)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    out = reward(prompts=[prompt] * len(batch), completions=[b[1] for b in batch], image=[b[0] for b in batch])
    assert len(out) == len(batch)
    assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in out)
