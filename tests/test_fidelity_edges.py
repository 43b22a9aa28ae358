"""Fidelity at the edges: float32 rotary tables under bf16, XComposer2.5's unused adapters."""

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

from multitap_rl.errors import CheckpointError

from _checkpoints import load, read_state, write_checkpoint


def test_rotary_tables_stay_float32_whatever_the_cast(backbone_dirs, images):
    """Every floating buffer (rotary inv_freq) stays float32 when the module is cast to bf16, as the
    references keep it, so a cast model scores exactly like one loaded in bf16."""
    loaded = load(backbone_dirs, dtype="bf16")
    cast = load(backbone_dirs, dtype="fp32")
    cast.backbone.model.to(torch.bfloat16)
    texts = ["A red circle.", "Two dogs on the grass.", "A tree."]
    want = loaded.score(images[:3], texts).overall
    got = cast.score(images[:3], texts).overall
    for model in (loaded, cast):
        buffers = {n: b.dtype for n, b in model.backbone.model.named_buffers() if b.is_floating_point()}
        assert all(d == torch.float32 for d in buffers.values()), buffers
    assert torch.equal(got, want)


def test_internlm_xc2_rope_in_bf16_is_the_float32_table_rounded(tiny_xc2_model):
    """At the real head size (128) and positions around 1000 -- where MULTI-TAP reads its score --
    cos/sin are computed in float32 and only the result is rounded, as XComposer2.5's remote code
    does. A bf16 inv_freq would put them off by up to ~1 there."""
    from multitap_rl.backbones.internlm_xc2 import InternLMXC2Model

    cfg = dataclasses.replace(tiny_xc2_model.backbone.model.config, hidden_size=256, num_attention_heads=2)
    positions = torch.arange(1100)[None]
    cos, sin = InternLMXC2Model.rope(SimpleNamespace(config=cfg), positions, torch.bfloat16)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, 128, 2).float() / 128))
    freqs = torch.einsum("i,j->ij", torch.arange(1100, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    assert cos.shape == (1, 1, 1100, 128)
    assert torch.equal(cos[0, 0], emb.cos().to(torch.bfloat16)) and torch.equal(sin[0, 0], emb.sin().to(torch.bfloat16))
    rounded = torch.einsum("i,j->ij", torch.arange(1100, dtype=torch.float32), inv_freq.bfloat16().float())
    assert float((rounded.cos() - freqs.cos()).abs()[850:].max()) > 0.5  # what the bug class looks like here


def test_internlm_xc2_unused_partial_lora_adapters_load_and_are_reported(tiny_xc2_dirs, tmp_path, images, caplog):
    """The released XComposer2.5 code carries lora_{sft,dpo,web}_{A,B} on every P-LoRA linear: a
    checkpoint holding them loads (they are named as ignored) and scores as without them; any
    other unknown key is still refused."""
    base, reward = tiny_xc2_dirs
    state = read_state(reward)
    extra = {}
    for key, value in state.items():
        if key.endswith(".Plora_A.weight"):
            stem = key[: -len(".Plora_A.weight")]
            out_features = state[f"{stem}.Plora_B.weight"].shape[0]
            for mode in ("sft", "dpo", "web"):
                extra[f"{stem}.lora_{mode}_A.weight"] = torch.randn(8, value.shape[1])
                extra[f"{stem}.lora_{mode}_B.weight"] = torch.randn(out_features, 8)
    n_linears = sum(k.endswith(".Plora_A.weight") for k in state)
    assert len(extra) == 6 * n_linears > 0
    with_adapters = write_checkpoint({**state, **extra}, tmp_path / "adapters", reward)
    with caplog.at_level(logging.INFO, logger="multitap_rl.model"):
        model = load((base, with_adapters))
    assert "lora_sft_A" in caplog.text and "lora_web_B" in caplog.text
    plain = load((base, write_checkpoint(state, tmp_path / "plain", reward)))
    texts = ["A red circle.", "Two dogs."]
    assert torch.equal(model.score(images[:2], texts).overall, plain.score(images[:2], texts).overall)
    stem = next(k for k in state if k.endswith(".Plora_A.weight"))[: -len(".Plora_A.weight")]
    odd = write_checkpoint({**state, f"{stem}.lora_foo_A.weight": torch.randn(8, 4)}, tmp_path / "odd", reward)
    with pytest.raises(CheckpointError, match="lora_foo_A"):
        load((base, odd))


# -- tokenisation as MULTI-TAP ran it (transformers 4.46.1) ------------------------------------------
def test_internlm2_tokenizer_matches_transformers_446(tiny_xc2_dirs):
    """Under 4.46.1 the whitespace next to a literal <s>, </s> or <unk> in a text is kept (4.33
    stripped it). Stored ids from tools/tokenizer_internlm2_446.py over 409 seeded texts."""
    import hashlib
    import json
    from pathlib import Path

    from multitap_rl.backbones.internlm_xc2 import InternLM2Tokenizer

    base, _ = tiny_xc2_dirs
    stored = json.loads((Path(__file__).parent / "data" / "internlm2_tokenizer_446.json").read_text())
    assert stored["transformers"] == "4.46.1"
    assert hashlib.sha256((base / "tokenizer.model").read_bytes()).hexdigest() == stored["tokenizer_model_sha256"]
    tok = InternLM2Tokenizer(base)
    specials = [c for c in stored["cases"] if any(s in c["text"] for s in ("<s>", "</s>", "<unk>"))]
    assert len(specials) > 50 and any(" <s> " in c["text"] for c in specials)
    for c in stored["cases"]:
        assert tok.encode(c["text"], add_bos=False) == c["ids"], c["text"]
        assert tok.encode(c["text"], add_bos=True) == c["ids_bos"], c["text"]


# -- every completion a policy can emit ------------------------------------------------------------
def test_empty_completions_get_the_references_score_by_default(backbone_model, images):
    from reward_fns import multitap_reward

    texts = ["A red circle.", "", "   ", "\n"]
    prompts = [[{"role": "user", "content": "Describe this image."}]] * 4
    want = backbone_model.score(images[:4], texts).overall.tolist()
    got = multitap_reward(backbone_model)(prompts, texts, image=images[:4])
    assert got == pytest.approx(want, abs=1e-6) and all(isinstance(v, float) for v in got)
    floor = multitap_reward(backbone_model, empty_reward=-1.0)(prompts, texts, image=images[:4])
    assert floor[1:] == [-1.0, -1.0, -1.0] and floor[0] == pytest.approx(want[0], abs=1e-6)
    assert multitap_reward(backbone_model, empty_reward=None)(prompts, texts, image=images[:4])[1:] == [None] * 3
    out = backbone_model.score(images[:2], ["", "x"], ["", " "])  # an empty question is scored too
    assert torch.isfinite(out.overall).all()


def test_internlm_xc2_image_placeholder_in_a_text_is_scored_as_the_reference(tiny_xc2_model, images, caplog):
    """A literal <ImageHere> in a caption: the reference splits the prompt there, keeps the image at
    the first placeholder and tokenizes each remaining part on its own (with a warning)."""
    from multitap_rl.backbones.internlm_xc2 import END, IMAGE_ID

    bb = tiny_xc2_model.backbone
    image = bb.prepare_image(images[0].convert("RGB"))
    with caplog.at_level(logging.WARNING, logger="multitap_rl.backbones.internlm_xc2"):
        tok = bb.tokenize("a cat <ImageHere> on a mat", None, image)
    assert "<ImageHere>" in caplog.text
    plain = bb.tokenize("a cat ", None, image)
    enc = bb.tokenizer.encode
    assert tok.ids == plain.ids[: plain.prefix_len] + enc(";a cat ", add_bos=False) + enc(" on a mat" + END, add_bos=False)
    assert tok.prefix_len == plain.prefix_len and tok.ids.count(IMAGE_ID) == image.num_tokens
    out = tiny_xc2_model.score(images[:2], ["a cat <ImageHere> on a mat", "<ImageHere>"])
    assert torch.isfinite(out.overall).all() and not out.errors


def test_qwen2_vl_image_block_comes_from_the_layout_not_the_text(tiny_dirs, images):
    """A caption ending in a literal <|vision_end|> is text: a long one is truncated and scored as
    the reference does. A question that pushes the image past max_length is named as the question."""
    from multitap_rl.errors import SampleError

    model = load(tiny_dirs, max_length=80, image_size=56)
    bb = model.backbone
    image = bb.prepare_image(bb.resize(images[0].convert("RGB")))
    caption = "a red circle " * 30 + "<|vision_end|>"
    tok = bb.tokenize(caption, None, image)
    short = bb.tokenize("a", None, image)
    assert tok.truncated and len(tok.ids) == 80 and tok.prefix_len == short.prefix_len < 80
    assert torch.isfinite(model.score(images[:1], [caption]).overall).all()
    with pytest.raises(SampleError, match=r"question 0: prompt of \d+ tokens: the part up to the end of the "
                                        r"image .* reaches max_length=80"):
        model.score(images[:1], ["a"], ["why " * 80])
    with pytest.raises(SampleError, match=r"text 0: holds the image placeholder"):
        model.score(images[:1], ["a <|image_pad|> b"])
