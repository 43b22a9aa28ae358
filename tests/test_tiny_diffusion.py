"""The tiny offline Stable-Diffusion-style pipeline (multitap_rl.testing)."""

import hashlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from multitap_rl.testing import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "a", seed=0)


def test_same_seed_same_bytes_other_seed_other_weights(sd_dir, tmp_path):
    from multitap_rl.testing import build_tiny_stable_diffusion

    again = build_tiny_stable_diffusion(tmp_path / "b", seed=0)
    assert _digests(sd_dir) == _digests(again)
    other = _digests(build_tiny_stable_diffusion(tmp_path / "c", seed=1))
    first = _digests(sd_dir)
    assert other["unet/diffusion_pytorch_model.safetensors"] != first["unet/diffusion_pytorch_model.safetensors"]


def test_pipeline_loads_and_generates(sd_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.safety_checker is None
    # LoRA targets of TRL's DDPO pipeline exist (cross-attention blocks)
    names = {n.rsplit(".", 1)[-1] for n, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names
    gen = torch.Generator().manual_seed(0)
    out = pipe(["a red circle on the left", "a dog"], num_inference_steps=3, output_type="pt", generator=gen)
    images = out.images
    assert images.shape == (2, 3, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.01  # not a constant image
    again = pipe(["a red circle on the left", "a dog"], num_inference_steps=3, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(images, again)


def test_clip_tokenizer_is_clip_like(sd_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    assert tok.tokenize("A RED circle!") == ["a</w>", "red</w>", "circle</w>", "!</w>"]
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length).input_ids[0]
    assert len(ids) == tok.model_max_length == 32
    assert ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id
    assert tok.decode(tok("zebra", add_special_tokens=False).input_ids) == "zebra"  # unseen word: byte pieces


def test_bad_image_size():
    from multitap_rl.testing import tiny_stable_diffusion_pipeline

    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_stable_diffusion_pipeline(image_size=30)


def test_learn_bpe_hand_computed():
    from multitap_rl.testing.diffusion import _learn_bpe

    # "ab" x3, "abc" x1: pairs (a,b</w>)=3, (a,b)=1, (b,c</w>)=1 -> first merge a+b</w>;
    # then "abc" still has (a,b)=1, (b,c</w>)=1 -> tie broken by the pair: ("a","b") < ("b","c</w>").
    assert _learn_bpe({"ab": 3, "abc": 1}, 2) == [("a", "b</w>"), ("a", "b")]
