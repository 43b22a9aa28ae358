"""Our scores equal those of the real transformers 4.46.1 (the MULTI-TAP reference's version).

tests/data/reference_446_scores.json holds, for the seed-0 tiny model, the overall scores and
last hidden states computed by tools/reference_446.py in a transformers-4.46.1 virtualenv (the
reference's padded, one-sample-at-a-time forward), with a sha256 fingerprint of the model's files.
Here the tiny model is rebuilt and scored by ``MultiTapModel``; the numbers must agree to 1e-5.
If the rebuilt files differ from the fingerprinted ones (another torch/tokenizers/transformers
makes other tiny bytes), the stored numbers do not apply and the comparison is skipped, naming
the files; regenerate with ``bash tools/regenerate_reference_446.sh`` (tools/README.md).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from _stored_446 import ROOT, load_tool, stored_fixtures
from multitap_rl import EngineConfig, MultiTapModel
from multitap_rl.testing import build_tiny_multitap, make_image

DATA = ROOT / "tests" / "data" / "reference_446_scores.json"
ATOL = 1e-5


stored, model_dir = stored_fixtures(DATA, lambda out, info: build_tiny_multitap(out, seed=info["seed"], size=info["size"]), 'tiny model', 'qwen2_vl')


def _load(model_dir, max_length=1024, engine=None):
    return MultiTapModel.from_pretrained(model_dir / "reward", base_model=model_dir / "base", device="cpu",
                                         max_length=max_length, engine=engine)


def _by_max_length(cases):
    """{max_length: (indices, images, texts, questions)}: one model per truncation length."""
    groups = {}
    for i, c in enumerate(cases):
        idx, images, texts, questions = groups.setdefault(c["max_length"], ([], [], [], []))
        idx.append(i)
        images.append(make_image(c["image"]["seed"], size=tuple(c["image"]["size"])))
        texts.append(c["text"])
        questions.append(c["question"])
    return groups


def test_stored_data_covers_the_cases_that_matter(stored):
    cases = stored["cases"]
    assert stored["versions"]["transformers"] == "4.46.1"
    assert stored["settings"]["dtype"] == "float32"
    assert {c["max_length"] for c in cases} == {1024, 2048}  # the reference scripts use both
    assert any(c["truncated"] and c["question"] is None for c in cases)  # caption past 1024 tokens
    assert any(c["truncated"] and c["question"] is not None for c in cases)
    assert sum(c["question"] is not None for c in cases) >= 3  # instruction task
    assert len({(c["image"]["seed"], tuple(c["image"]["size"])) for c in cases}) >= 5
    for c in cases:
        assert c["kept_tokens"] == min(c["prompt_tokens"], c["max_length"])
        assert len(c["hidden"]) > 0 and 0.0 < c["overall"] < 1.0
    # the stored scores spread out: a constant scorer could not pass the comparison
    overall = [c["overall"] for c in cases]
    assert max(overall) - min(overall) > 0.1


def test_tool_draws_the_same_images_as_the_package():
    """tools/reference_446.py runs without the package; its make_image must be the package's."""
    tool_make_image = load_tool().load_make_image(ROOT)
    for seed, size in [(0, (64, 48)), (6, (800, 600)), (5, (40, 90))]:
        a, b = tool_make_image(seed, size=size), make_image(seed, size=size)
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_prompts_tokenize_as_in_transformers_446(model_dir, stored):
    """Same prompt length, truncation and last token as the 4.46.1 processor produced."""
    models = {}
    for c in stored["cases"]:
        if c["max_length"] not in models:
            models[c["max_length"]] = _load(model_dir, c["max_length"])
        bb = models[c["max_length"]].backbone
        image = bb.prepare_image(make_image(c["image"]["seed"], size=tuple(c["image"]["size"])))
        assert [int(v) for v in image.inputs["image_grid_thw"][0]] == c["image_grid_thw"], c["name"]
        tok = bb.tokenize(c["text"], c["question"], image)
        assert (len(tok.ids), tok.truncated, tok.ids[-1]) == (
            c["kept_tokens"], c["truncated"], c["last_token_id"]), c["name"]


@pytest.mark.parametrize("engine", [
    None,  # defaults: shared images and prefixes
    EngineConfig(share_images=False, share_prefix=False, max_batch_tokens=2048),  # plain, micro-batched
], ids=["shared", "plain"])
def test_scores_match_transformers_446(model_dir, stored, engine):
    cases = stored["cases"]
    got = torch.full((len(cases),), float("nan"))
    h = torch.full((len(cases), len(cases[0]["hidden"])), float("nan"))
    for max_length, (idx, images, texts, questions) in _by_max_length(cases).items():
        model = _load(model_dir, max_length, engine)
        got[idx] = model.score(images, texts, questions).overall
        h[idx] = model.features(images, texts, questions)
    expected = torch.tensor([c["overall"] for c in cases])
    diff = (got - expected).abs()
    worst = int(diff.argmax())
    assert float(diff.max()) <= ATOL, (
        f"case {cases[worst]['name']!r}: ours {float(got[worst]):.8f} vs transformers 4.46.1 "
        f"{float(expected[worst]):.8f} (max |diff| {float(diff.max()):.3g})"
    )
    expected_h = torch.tensor([c["hidden"] for c in cases])
    assert h.shape == expected_h.shape
    hdiff = (h - expected_h).abs().amax(dim=1)
    worst = int(hdiff.argmax())
    assert float(hdiff.max()) <= ATOL, (
        f"case {cases[worst]['name']!r}: last hidden state differs from 4.46.1 by {float(hdiff.max()):.3g}"
    )
