"""InternLM-XComposer2.5 scores equal those of XComposer2.5's own remote code.

tests/data/reference_internlm_xc2_scores.json holds, for the seed-0 tiny XComposer2.5 model, what
tools/reference_internlm_xc2.py computed with the remote modelling code under transformers 4.33.2
(MULTI-TAP's ``prepare_input`` + ``VLMRewardModel.forward``; plus XComposer2.5's own P-LoRA mask and
HD transform for the adapter's options), with a sha256 fingerprint of the model's files. Here the
tiny model is rebuilt and scored by ``MultiTapModel``. If the rebuilt files differ from the
fingerprinted ones, the comparison is skipped, naming the files; regenerate with
``bash tools/regenerate_reference_internlm_xc2.sh`` (tools/README.md).

Tolerance (float32 on CPU, not tuned): token ids, crop grids and pixel values must be *equal*; so
must the vision tokens before the projector (their CLIP features are rounded to bfloat16 by the
reference, so any float32 difference at a rounding boundary would show as a jump of 2^-8
relative: equal sums prove there is none). After that the two computations differ only in the
order of float32 operations (SDPA vs matmul-softmax attention, fused vs separate reductions): a
relative rounding of 2^-24 per operation over about 20 dependent stages with reductions of length
up to ~3000 (error growth ~log2(n) per blocked reduction) bounds the relative error of a hidden
state by roughly 20 * 12 * 6e-8 = 1.4e-5; hidden states here have |h| <= ~4, but the error of a
sum of rounding errors grows like its square root, so 1e-5 absolute is the bound we hold both the
hidden states and the scores (sigmoid' <= 1/4) to. Measured: <= 2e-6 on hidden states, <= 3e-7 on
scores.
"""

from __future__ import annotations


import re

import pytest
import torch

from _stored_446 import ROOT, stored_fixtures
from multitap_rl import EngineConfig, MultiTapModel
from multitap_rl.testing import build_tiny_internlm_xc2_multitap, make_image

DATA = ROOT / "tests" / "data" / "reference_internlm_xc2_scores.json"
ATOL = 1e-5


stored, model_dir = stored_fixtures(DATA, lambda out, info: build_tiny_internlm_xc2_multitap(out, seed=info["seed"]), 'tiny InternLM-XComposer2.5 model', 'internlm_xc2', regenerate='XC25_REMOTE_CODE=... bash tools/regenerate_reference_internlm_xc2.sh')


def _setting(case):
    return case["plora"], case["hd"]


def _load(model_dir, plora="reference", hd=False, engine=None):
    return MultiTapModel.from_pretrained(
        model_dir / "reward", base_model=model_dir / "base", device="cpu", image_size=None if hd else 560,
        backbone_options={"plora": plora} if plora != "reference" else None, engine=engine)


_SPECIAL_WITH_SPACE = re.compile(r"\s*(</s>|<s>|<unk>)\s*")


def _text_433(text: str) -> str:
    """The stored numbers come from the remote code under transformers 4.33.2, which strips the
    whitespace next to a literal <s>, </s> or <unk> in a text; we tokenize as 4.46.1 does (what
    MULTI-TAP ran: the whitespace is kept; tests/test_fidelity_edges.py). Stripping it from the
    text first gives exactly the 4.33.2 tokens, so every stored case is still compared."""
    return _SPECIAL_WITH_SPACE.sub(r"\1", text)


def _image(case):
    return make_image(case["image"]["seed"], size=tuple(case["image"]["size"]))


def test_stored_data_records_the_reference_facts(stored):
    """What the remote code was measured to do (see backbones/internlm_xc2.py)."""
    cases = stored["cases"]
    assert stored["versions"]["transformers"] == "4.33.2" and stored["settings"]["dtype"] == "float32"
    ref = [c for c in cases if c["plora"] == "reference" and not c["hd"]]
    assert len(ref) >= 8
    for c in ref:
        # the query MULTI-TAP builds: "<ImageHere>;" + caption (the later of two dict keys wins)
        want = (c["question"] or "") + "<ImageHere>;" + c["text"]
        assert c["query"] == want, c["name"]
        # the image mask exists (841 image tokens) but the backbone sees none: P-LoRA unused
        assert c["image_mask_tokens"] == c["image_tokens"] == 841 and c["plora_rows_seen"] == 0, c["name"]
        # to_tensor(...).bfloat16(): bfloat16 pixels, one 560 crop; CLIP features back in bfloat16
        assert c["pixels"]["dtype"] == "bfloat16" and c["pixels"]["shape"] == [1, 3, 560, 560], c["name"]
        assert c["crops"] == [1, 1] and c["clip_features_bfloat16_exact"], c["name"]
        assert c["hd_num"] == 24
    assert {c["plora_rows_seen"] for c in cases if c["plora"] == "image"} == {841}
    hd = [c for c in cases if c["hd"]]
    assert all(c["pixels"]["dtype"] == "float32" for c in hd)
    assert {tuple(c["crops"]) for c in hd} >= {(1, 1), (2, 1), (2, 2), (2, 3)}
    assert all(c["image_tokens"] == (c["crops"][0] * c["crops"][1] + 1) * 400 + 1 + (c["crops"][0] + 1) * 20
               for c in cases)
    # position -1: the "\n" closing "[UNUSED_TOKEN_146]assistant\n"; no padding
    assert len({c["last_token_id"] for c in cases}) == 1
    assert all(len(c["ids"]) == c["positions"] for c in cases)
    assert any(c["positions"] > 1024 for c in ref)  # not cut at 1024: the reference's max_length is 16384
    overall = [c["overall"] for c in cases]
    assert max(overall) - min(overall) > 0.1


def test_inputs_equal_the_remote_codes(model_dir, stored):
    """Token ids, image positions, crop grid, pixel values and the vision tokens (before the
    projector, incl. the bfloat16 rounding of the CLIP features): equal, not close (the vision
    tokens up to a few bfloat16 rounding steps, see below)."""
    models = {}
    for c in stored["cases"]:
        key = _setting(c)
        if key not in models:
            models[key] = _load(model_dir, *key)
        bb = models[key].backbone
        image = bb.prepare_image(_image(c))
        tok = bb.tokenize(_text_433(c["text"]), c["question"], image)
        assert tok.ids == c["ids"], c["name"]
        assert tok.ids[-1] == c["last_token_id"] and not tok.truncated
        assert image.inputs["crops"].tolist() == c["crops"], c["name"]
        px = image.inputs["pixel_values"]
        assert str(px.dtype).replace("torch.", "") == c["pixels"]["dtype"], c["name"]
        assert float(px.double().sum()) == c["pixels"]["sum"], c["name"]
        with torch.no_grad():
            tokens = bb.model.view_tokens(px, tuple(c["crops"]))
        assert tokens.shape[0] == c["image_tokens"]
        # The CLIP tower runs in float32, whose last bits differ between CPU kernels; rounding its
        # output to bfloat16 can then put an element one bf16 step (2**-8 of its binade, at most
        # 2**-7 * max|t|) away. Allow a handful of such steps, never a real change of the values.
        step = 2.0 ** -7 * float(tokens.double().abs().max())
        assert abs(float(tokens.double().sum()) - c["view_tokens_sum"]) <= 8 * step, c["name"]


@pytest.mark.parametrize("engine", [
    None,  # defaults: shared images and prefixes
    EngineConfig(share_images=False, share_prefix=False, max_batch_tokens=4096),  # plain, micro-batched
], ids=["shared", "plain"])
def test_scores_match_the_remote_code(model_dir, stored, engine):
    cases = stored["cases"]
    got = torch.full((len(cases),), float("nan"))
    h = torch.full((len(cases), len(cases[0]["hidden"])), float("nan"))
    groups: dict = {}
    for i, c in enumerate(cases):
        groups.setdefault(_setting(c), []).append(i)
    for key, idx in groups.items():
        model = _load(model_dir, *key, engine=engine)
        images = [_image(cases[i]) for i in idx]
        texts = [_text_433(cases[i]["text"]) for i in idx]
        questions = [cases[i]["question"] for i in idx]
        got[idx] = model.score(images, texts, questions).overall
        h[idx] = model.features(images, texts, questions)
    expected = torch.tensor([c["overall"] for c in cases])
    diff = (got - expected).abs()
    worst = int(diff.argmax())
    assert float(diff.max()) <= ATOL, (
        f"case {cases[worst]['name']!r}: ours {float(got[worst]):.8f} vs remote code {float(expected[worst]):.8f}")
    hdiff = (h - torch.tensor([c["hidden"] for c in cases])).abs().amax(dim=1)
    worst = int(hdiff.argmax())
    assert float(hdiff.max()) <= ATOL, f"case {cases[worst]['name']!r}: hidden state differs by {float(hdiff.max()):.3g}"
