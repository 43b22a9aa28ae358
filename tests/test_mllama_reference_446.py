"""Llama-3.2-Vision (Mllama) scores equal those of the real transformers 4.46.1.

tests/data/reference_446_mllama_scores.json holds, for the seed-0 tiny Mllama model, the overall
scores and the hidden state at position -1 computed by tools/reference_446_mllama.py in a
transformers-4.46.1 virtualenv (the reference's right-padded, one-sample-at-a-time forward), with
a sha256 fingerprint of the model's files. Here the tiny model is rebuilt and scored by
``MultiTapModel``; the numbers must agree to 1e-5. If the rebuilt files differ from the
fingerprinted ones, the comparison is skipped, naming the files; regenerate with
``bash tools/regenerate_reference_446.sh mllama`` (tools/README.md).
"""

from __future__ import annotations


import pytest
import torch

from _stored_446 import ROOT, stored_fixtures
from multitap_rl import EngineConfig, MultiTapModel
from multitap_rl.testing import build_tiny_mllama_multitap, make_image

DATA = ROOT / "tests" / "data" / "reference_446_mllama_scores.json"
ATOL = 1e-5


stored, model_dir = stored_fixtures(DATA, lambda out, info: build_tiny_mllama_multitap(out, seed=info["seed"]), 'tiny Mllama model', 'mllama')


def _load(model_dir, max_length, pad_token=None, engine=None):
    return MultiTapModel.from_pretrained(
        model_dir / "reward", base_model=model_dir / "base", device="cpu", max_length=max_length, engine=engine,
        backbone_options={"pad_token": pad_token} if pad_token else None,
    )


def _groups(cases):
    """{(max_length, pad_token): [case index, ...]}: one model per reference setting."""
    groups = {}
    for i, c in enumerate(cases):
        groups.setdefault((c["max_length"], c["pad_token"]), []).append(i)
    return groups


def _image(case):
    return make_image(case["image"]["seed"], size=tuple(case["image"]["size"]))


def test_stored_data_covers_the_cases_that_matter(stored):
    cases = stored["cases"]
    assert stored["versions"]["transformers"] == "4.46.1"
    assert stored["settings"]["dtype"] == "float32"
    assert {c["max_length"] for c in cases} >= {1024, 2048}
    assert all(c["padding_side"] == "right" for c in cases)  # the hub Llama-3.2-Vision tokenizer
    assert all(c["leading_bos"] == 2 for c in cases)  # chat template BOS + the tokenizer's BOS
    padded = [c for c in cases if c["kept_tokens"] < c["max_length"]]
    full = [c for c in cases if c["kept_tokens"] == c["max_length"]]
    assert padded and full
    # position -1 of the reference's sequence: a pad token whenever the prompt is shorter
    assert all(c["last_token_id"] == c["pad_token_id"] for c in padded)
    assert any(c["truncated"] and c["question"] is None for c in full)
    assert any(c["truncated"] and c["question"] is not None for c in full)
    assert any(c["pad_token"] for c in padded)  # the stage-1 training setting (pad = eos)
    # the same prompt read at 1023 vs 2047 (pad readout) differs: max_length matters on the right
    by_name = {c["name"]: c for c in cases}
    assert abs(by_name["medium"]["overall"] - by_name["medium_2048"]["overall"]) > 1e-4
    overall = [c["overall"] for c in cases]
    assert max(overall) - min(overall) > 0.1


def test_prompts_tokenize_as_in_transformers_446(model_dir, stored):
    """Same length, truncation, <|image|> position, tiles and token at position -1 as 4.46.1."""
    for (max_length, pad_token), idx in _groups(stored["cases"]).items():
        bb = _load(model_dir, max_length, pad_token).backbone
        for i in idx:
            c = stored["cases"][i]
            image = bb.prepare_image(_image(c))
            assert int(image.inputs["num_tiles"]) == c["num_tiles"], c["name"]
            tok = bb.tokenize(c["text"], c["question"], image)
            assert (len(tok.ids), tok.truncated, tok.prefix_len - 1) == (
                c["kept_tokens"], c["truncated"], c["image_token_index"]), c["name"]
            at_minus_one = bb.pad_id if len(tok.ids) < max_length else tok.ids[-1]
            assert at_minus_one == c["last_token_id"], c["name"]


@pytest.mark.parametrize("engine", [
    None,  # defaults: shared images and prefixes
    EngineConfig(share_images=False, share_prefix=False, max_batch_tokens=2048),  # plain, micro-batched
], ids=["shared", "plain"])
def test_scores_match_transformers_446(model_dir, stored, engine):
    cases = stored["cases"]
    got = torch.full((len(cases),), float("nan"))
    h = torch.full((len(cases), len(cases[0]["hidden"])), float("nan"))
    for (max_length, pad_token), idx in _groups(cases).items():
        model = _load(model_dir, max_length, pad_token, engine)
        images = [_image(cases[i]) for i in idx]
        texts = [cases[i]["text"] for i in idx]
        questions = [cases[i]["question"] for i in idx]
        got[idx] = model.score(images, texts, questions).overall
        h[idx] = model.features(images, texts, questions)
    expected = torch.tensor([c["overall"] for c in cases])
    diff = (got - expected).abs()
    worst = int(diff.argmax())
    assert float(diff.max()) <= ATOL, (
        f"case {cases[worst]['name']!r}: ours {float(got[worst]):.8f} vs transformers 4.46.1 "
        f"{float(expected[worst]):.8f} (max |diff| {float(diff.max()):.3g})"
    )
    hdiff = (h - torch.tensor([c["hidden"] for c in cases])).abs().amax(dim=1)
    worst = int(hdiff.argmax())
    assert float(hdiff.max()) <= ATOL, (
        f"case {cases[worst]['name']!r}: hidden state at position -1 differs from 4.46.1 by {float(hdiff.max()):.3g}"
    )
