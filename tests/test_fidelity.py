"""Scores equal the reference computation to <= 1e-5 in float32, for every backbone.

The references re-implement the MULTI-TAP forward on transformers 5 (one padded sample at a
time, full model with logits): ``multitap_rl.testing.ReferenceScorer`` (Qwen2-VL) and
``MllamaReferenceScorer`` (Llama-3.2-Vision); both are checked against transformers 4.46.1 itself
by tests/test_reference_446.py and tests/test_mllama_reference_446.py.
"""

import pytest
import torch

from multitap_rl import EngineConfig, MultiTapModel
from multitap_rl.testing import MllamaReferenceScorer, ReferenceScorer

CAPTIONS = [
    "Dog.",
    "A red circle on the left of a small white square.",
    "There is a bright green triangle near the top corner, and a dark blue cross at the bottom, "
    "with some grass and a tree behind the house.",
    "A big orange circle " * 200,  # long enough that the reference truncates it at 1024 tokens
]


REFERENCES = {"qwen2_vl": ReferenceScorer, "mllama": MllamaReferenceScorer}


@pytest.fixture(scope="module")
def reference(backbone_family, backbone_dirs, tmp_path_factory):
    if backbone_family not in REFERENCES:  # remote-code models: no transformers-5 reference to run here
        pytest.skip(f"{backbone_family}: compared with its remote code's stored numbers instead "
                    "(tests/test_internlm_xc2_reference.py)")
    base, reward = backbone_dirs
    return REFERENCES[backbone_family](base, reward, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def qwen_reference(tiny_dirs, tmp_path_factory):
    base, reward = tiny_dirs
    return ReferenceScorer(base, reward, tmp_path_factory.mktemp("ref_qwen"))


def _engines(dirs):
    base, reward = dirs
    yield "shared", MultiTapModel.from_pretrained(reward, base_model=base, device="cpu")
    yield "plain", MultiTapModel.from_pretrained(
        reward, base_model=base, device="cpu",
        engine=EngineConfig(share_images=False, share_prefix=False, max_batch_tokens=2048),
    )


def test_caption_task_matches_reference(backbone_dirs, reference, images):
    imgs = [images[i % len(images)] for i in range(len(CAPTIONS))]
    expected = torch.tensor([reference.score(im, t) for im, t in zip(imgs, CAPTIONS)])
    # the long caption really is truncated by the reference and by us
    model = dict(_engines(backbone_dirs))["shared"]
    tok = model.backbone.tokenize(CAPTIONS[-1], None, model.backbone.prepare_image(imgs[-1]))
    assert tok.truncated and len(tok.ids) == 1024
    for name, model in _engines(backbone_dirs):
        got = model.score(imgs, CAPTIONS).overall
        assert got.dtype == torch.float32 and got.shape == (len(CAPTIONS),)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (name, got, expected)
    # scores differ between captions: the test would catch a constant scorer
    assert float(expected.max() - expected.min()) > 1e-3


def test_instruction_task_matches_reference(backbone_model, reference, images):
    questions = ["What colour is the shape?", "Where is the circle?", "How many objects are there?"]
    responses = ["It is red.", "On the left side of the picture, near the top.", "Two."]
    imgs = images[:3]
    expected = torch.tensor([reference.score(im, r, q) for im, r, q in zip(imgs, responses, questions)])
    got = backbone_model.score(imgs, responses, questions).overall
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)
    # the instruction layout differs from the caption layout
    caption_scores = backbone_model.score(imgs, responses).overall
    assert not torch.allclose(got, caption_scores, atol=1e-4)


def test_features_are_the_reference_hidden_state(backbone_model, reference, images):
    h = backbone_model.features(images[:2], CAPTIONS[:2])
    assert h.shape == (2, backbone_model.hidden_size) and h.dtype == torch.float32
    for i in range(2):
        ref = reference.hidden(images[i], CAPTIONS[i])[0]
        assert torch.allclose(h[i], ref, atol=1e-4, rtol=1e-4)


def test_mrope_is_opt_in_and_matches_transformers_mrope(tiny_dirs, qwen_reference, images):
    """rope="mrope" equals transformers 5's own M-RoPE forward; it differs from the default."""
    base, reward = tiny_dirs
    model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", rope="mrope")
    text = CAPTIONS[1]
    inputs = qwen_reference.inputs(images[0], text)
    keep = inputs["attention_mask"][0].bool()
    ids = inputs["input_ids"][:, keep]
    with torch.no_grad():
        out = qwen_reference.model(
            input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=(ids == qwen_reference.model.config.image_token_id).int(), output_hidden_states=True,
        )
        expected = torch.sigmoid(qwen_reference.head(out.hidden_states[-1][:, -1])).squeeze()
    got = model.score([images[0]], [text]).overall[0]
    assert abs(float(got) - float(expected)) <= 1e-5
    default = qwen_reference.score(images[0], text)
    assert abs(float(got) - default) > 1e-6  # M-RoPE really changes scores (docs/ARCHITECTURE.md)
