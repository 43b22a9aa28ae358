"""Llama-3.2-Vision (Mllama) specifics: selection by config, key layouts, the right-padding
readout, the 4.46.1 vision features, and bad input. (Fidelity and sharing for every backbone:
test_fidelity.py, test_sharing.py; against transformers 4.46.1 itself: test_mllama_reference_446.py.)"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from _checkpoints import load, read_state, write_checkpoint
from multitap_rl import EngineConfig, MultiTapModel
from multitap_rl.backbones import BACKBONES, MllamaBackbone, backbone_for
from multitap_rl.checkpoint import CheckpointError
from multitap_rl.testing import MllamaReferenceScorer, make_image

TEXTS = ["A red circle.", "Two dogs sitting on the grass near a tree."]


# -- selection and loading -------------------------------------------------------------------------
def test_backbone_comes_from_config_model_type_not_from_the_name(tiny_mllama_dirs, tmp_path, images):
    """A Llama-3.2-Vision base model in a directory named like Qwen2-VL is still Mllama."""
    from transformers import AutoConfig

    base, reward = tiny_mllama_dirs
    assert BACKBONES["mllama"] is MllamaBackbone
    assert backbone_for(AutoConfig.from_pretrained(base)) is MllamaBackbone
    odd_base = shutil.copytree(base, tmp_path / "Qwen2-VL-2B-Instruct")
    odd_ckpt = shutil.copytree(reward, tmp_path / "Multi-TAP-Qwen2-VL-2B")
    model = MultiTapModel.from_pretrained(odd_ckpt, base_model=odd_base, device="cpu")
    assert type(model.backbone) is MllamaBackbone and model.info["family"] == "mllama"
    assert model.hidden_size == 64


def test_transformers_5_key_layout_loads_to_the_same_scores(tiny_mllama_dirs, tiny_mllama_model, tmp_path, images):
    base, reward = tiny_mllama_dirs
    renamed = {}
    for key, value in read_state(reward).items():
        if key.startswith("backbone_model.language_model.lm_head."):
            key = "backbone_model.lm_head." + key.split("lm_head.", 1)[1]
        elif key.startswith("backbone_model.language_model.model."):
            key = "backbone_model.model.language_model." + key[len("backbone_model.language_model.model."):]
        elif key.startswith(("backbone_model.vision_model.", "backbone_model.multi_modal_projector.")):
            key = "backbone_model.model." + key[len("backbone_model."):]
        renamed[key] = value
    assert any(k.startswith("backbone_model.model.language_model.layers.") for k in renamed)
    ckpt = write_checkpoint(renamed, tmp_path / "v5", reward)
    got = MultiTapModel.from_pretrained(ckpt, base_model=base, device="cpu").score(images[:2], TEXTS).overall
    assert torch.equal(got, tiny_mllama_model.score(images[:2], TEXTS).overall)


def test_loading_is_strict(tiny_mllama_dirs, tmp_path):
    base, reward = tiny_mllama_dirs
    state = read_state(reward)
    dropped = "backbone_model.language_model.model.layers.1.cross_attn_attn_gate"
    assert dropped in state  # the cross-attention gate of layer 1
    missing = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(CheckpointError, match="cross_attn_attn_gate"):
        MultiTapModel.from_pretrained(write_checkpoint(missing, tmp_path / "a", reward), base_model=base, device="cpu")
    extra = {**state, "backbone_model.vision_model.not_a_weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="not_a_weight"):
        MultiTapModel.from_pretrained(write_checkpoint(extra, tmp_path / "b", reward), base_model=base, device="cpu")


@pytest.mark.parametrize("layout", ["released", "multitap"])
def test_save_pretrained_round_trip(tiny_mllama_dirs, tiny_mllama_model, tmp_path, images, layout):
    if not hasattr(tiny_mllama_model, "save_pretrained"):
        pytest.skip("MultiTapModel.save_pretrained is not available in this checkout")
    out = tiny_mllama_model.save_pretrained(tmp_path / layout, layout=layout)
    keys = load_file(str(out / "model.safetensors")).keys() if (out / "model.safetensors").is_file() else \
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys()
    prefix = "backbone_model.language_model.model." if layout == "released" else "backbone_model.model.language_model."
    assert any(k.startswith(prefix) for k in keys)
    again = MultiTapModel.from_pretrained(out, base_model=tiny_mllama_dirs[0], device="cpu")
    assert torch.equal(again.score(images[:2], TEXTS).overall, tiny_mllama_model.score(images[:2], TEXTS).overall)


def test_image_processing_without_torchvision(tiny_mllama_model, images):
    """The PIL image processor (no torchvision): one 560-pixel tile padded to four."""
    bb = tiny_mllama_model.backbone
    if importlib.util.find_spec("torchvision") is None:
        # the PIL processor (named MllamaImageProcessorPil in recent transformers), not the torchvision one
        assert type(bb.image_processor).__name__ in ("MllamaImageProcessorPil", "MllamaImageProcessor")
    prepared = bb.prepare_image(images[0])
    assert tuple(prepared.inputs["pixel_values"].shape) == (1, 1, 4, 3, 560, 560)
    assert int(prepared.inputs["num_tiles"]) == 1 and prepared.inputs["aspect_ratio_mask"].tolist() == [[[1, 0, 0, 0]]]
    assert prepared.num_tokens == 0  # cross-attention: no placeholder tokens in the prompt


# -- what the feature is ----------------------------------------------------------------------------
def test_prompt_has_two_bos_and_is_padded_on_the_right(tiny_mllama_model, images):
    bb = tiny_mllama_model.backbone
    bos = bb.tokenizer.bos_token_id
    tok = bb.tokenize(TEXTS[0], None, bb.prepare_image(images[0]))
    assert tok.ids[:3] == [bos, bos, bb.tokenizer.convert_tokens_to_ids("<|start_header_id|>")]
    assert tok.ids[tok.prefix_len - 1] == bb.image_token_id
    assert bb.padding_side == "right" and bb.readout
    assert bb.pad_id == bb.tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>")


def _exact_length_texts(bb, image):
    """Two captions whose prompts are n and n + 1 tokens long, and n."""
    a, b = "A red circle on the left of a small white square.", "A red circle on the left of a small white square. Dog"
    la, lb = (len(bb.tokenize(t, None, image).ids) for t in (a, b))
    assert lb > la
    return a, b, la


def test_readout_matches_reference_at_every_padding_boundary(tiny_mllama_dirs, images, tmp_path):
    """max_length = prompt length (no pad: last real token) and prompt length + k (pad at the end),
    and truncation: all equal the padded reference forward."""
    base, reward = tiny_mllama_dirs
    probe = load(tiny_mllama_dirs, max_length=None).backbone
    image = images[1]
    short, longer, n = _exact_length_texts(probe, probe.prepare_image(image))
    for max_length in (n, n + 1, n + 7):
        model = load(tiny_mllama_dirs, max_length=max_length)
        ref = MllamaReferenceScorer(base, reward, tmp_path / f"ref{max_length}", max_length=max_length)
        got = model.score([image, image], [short, longer]).overall
        expected = torch.tensor([ref.score(image, short), ref.score(image, longer)])
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (max_length, got, expected)
    # the same prompt read at different padded lengths gives different scores (right padding)
    s1 = load(tiny_mllama_dirs, max_length=n + 1).score([image], [short]).overall
    s7 = load(tiny_mllama_dirs, max_length=n + 7).score([image], [short]).overall
    assert abs(float(s1 - s7)) > 1e-5


def test_pad_token_option_is_the_stage1_training_readout(tiny_mllama_dirs, images, tmp_path):
    base, reward = tiny_mllama_dirs
    model = load(tiny_mllama_dirs, max_length=64, backbone_options={"pad_token": "<|eot_id|>"})
    ref = MllamaReferenceScorer(base, reward, tmp_path / "ref", max_length=64, pad_token="<|eot_id|>")
    got = model.score(images[:2], TEXTS).overall
    expected = torch.tensor([ref.score(im, t) for im, t in zip(images[:2], TEXTS)])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    default = load(tiny_mllama_dirs, max_length=64).score(images[:2], TEXTS).overall
    assert not torch.allclose(got, default, atol=1e-4)


def test_save_pretrained_records_the_pad_token_option(tiny_mllama_dirs, images, tmp_path):
    """A model loaded with pad_token= saves it in multitap_config.json; loading the saved model
    without options scores as the original, not with the tokenizer's default pad token."""
    eot = load(tiny_mllama_dirs, max_length=64, backbone_options={"pad_token": "<|eot_id|>"})
    before = eot.score(images[:2], TEXTS).overall
    out = eot.save_pretrained(tmp_path / "saved")
    assert json.loads((out / "multitap_config.json").read_text())["backbone_options"] == {"pad_token": "<|eot_id|>"}
    again = MultiTapModel.from_pretrained(out, device="cpu", max_length=64)
    assert torch.equal(again.score(images[:2], TEXTS).overall, before)
    default = MultiTapModel.from_pretrained(out, device="cpu", max_length=64,
                                            backbone_options={"pad_token": "<|finetune_right_pad_id|>"})
    assert not torch.allclose(default.score(images[:2], TEXTS).overall, before, atol=1e-4)


def test_left_padding_tokenizer_reads_the_last_real_token(tiny_mllama_dirs, images, tmp_path):
    """Padding side is measured, not assumed: a tokenizer configured to pad on the left gives the
    left-padded reference's number (the last real token; positions shifted, RoPE is relative)."""
    base, reward = tiny_mllama_dirs
    left = shutil.copytree(base, tmp_path / "left")
    cfg = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "left"}))
    model = MultiTapModel.from_pretrained(reward, base_model=left, device="cpu")
    assert model.backbone.padding_side == "left" and not model.backbone.readout
    ref = MllamaReferenceScorer(base, reward, tmp_path / "ref", padding_side="left")
    got = model.score(images[:2], TEXTS).overall
    expected = torch.tensor([ref.score(im, t) for im, t in zip(images[:2], TEXTS)])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_multi_tile_images_without_resize(tiny_mllama_dirs, images, tmp_path):
    """image_size=None: a wide image keeps its aspect ratio (two tiles); shared == plain == reference."""
    base, reward = tiny_mllama_dirs
    wide = make_image(11, size=(1120, 560))
    shared = load(tiny_mllama_dirs, image_size=None)
    assert int(shared.backbone.prepare_image(wide).inputs["num_tiles"]) == 2
    plain = load(tiny_mllama_dirs, image_size=None, engine=EngineConfig(share_images=False, share_prefix=False))
    ref = MllamaReferenceScorer(base, reward, tmp_path / "ref", image_size=None)
    imgs, texts = [wide, wide, images[0]], TEXTS + ["Dog."]
    expected = torch.tensor([ref.score(im, t) for im, t in zip(imgs, texts)])
    for model in (shared, plain):
        assert torch.allclose(model.score(imgs, texts).overall, expected, atol=1e-5, rtol=0)


def test_vision_features_are_the_446_intermediate_layers(tiny_mllama_model, images):
    """Intermediate features = the *input* of each listed local layer (4.46.1 and Meta's encoder),
    checked with hooks, independently of how the backbone arranges it."""
    bb = tiny_mllama_model.backbone
    vision = bb.model.vision_model
    wanted = list(vision.config.intermediate_layers_indices)
    captured = {}
    hooks = [vision.transformer.layers[k].register_forward_pre_hook(
        lambda mod, args, kwargs, k=k: captured.__setitem__(k, (args[0] if args else next(iter(kwargs.values()))).clone()),
        with_kwargs=True) for k in wanted]
    try:
        p = bb.prepare_image(images[0])
        with torch.no_grad():
            out = vision(pixel_values=p.inputs["pixel_values"], aspect_ratio_ids=p.inputs["aspect_ratio_ids"],
                         aspect_ratio_mask=p.inputs["aspect_ratio_mask"]).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    dim, tiles, patches = vision.hidden_size, vision.max_num_tiles, vision.num_patches
    stacked = torch.stack([captured[k] for k in wanted], dim=-1)  # (1, tiles * padded, dim, n)
    inter = stacked.reshape(1, tiles, -1, dim * len(wanted))[:, :, :patches]
    assert torch.equal(out[0, 0, :, :, dim:], inter[0])


def test_gradients_reach_cross_attention(tiny_mllama_dirs, images):
    """The readout's custom masks keep autograd intact (stage-1 training runs through forward)."""
    model = load(tiny_mllama_dirs, engine=EngineConfig(share_images=False, share_prefix=False))
    gate = model.backbone.model.language_model.layers[1].cross_attn_attn_gate
    gate.requires_grad_(True)
    with torch.enable_grad():
        model(images[:2], TEXTS).sum().backward()
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input_is_named(tiny_mllama_model, tiny_mllama_dirs, images):
    with pytest.raises(ValueError, match=r"text 1: .*<\|image\|>"):
        tiny_mllama_model.score(images[:2], ["Fine.", "Look: <|image|> twice."])
    model = load(tiny_mllama_dirs, max_length=16)
    with pytest.raises(ValueError, match="question 0: .*max_length=16"):
        model.score(images[:1], ["Yes."], ["Describe in detail what the small white square is doing " * 3])
    with pytest.raises(ValueError, match="rope"):
        load(tiny_mllama_dirs, rope="mrope")
    with pytest.raises(ValueError, match="not a token"):
        load(tiny_mllama_dirs, backbone_options={"pad_token": "<|no_such_token|>"})
    with pytest.raises(TypeError, match="pad_token"):
        load(tiny_mllama_dirs, backbone_options={"pad_token": 1.5})
    with pytest.raises(ValueError, match="max_length"):
        load(tiny_mllama_dirs, backbone_options={"max_length": 12})
    with pytest.raises(TypeError, match="backbone_options"):
        load(tiny_mllama_dirs, backbone_options=["pad_token"])


def test_tokenizer_without_pad_token_is_refused(tiny_mllama_model):
    bb = tiny_mllama_model.backbone
    tok = copy.deepcopy(bb.tokenizer)
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        MllamaBackbone(bb.model, tok, bb.image_processor, bb.chat_template)
    # max_length=None: nothing is padded, the feature is the last real token; allowed
    assert not MllamaBackbone(bb.model, tok, bb.image_processor, bb.chat_template, max_length=None).readout
    assert bb.model.vision_model.intermediate_layers_indices == [0]  # building twice shifted nothing twice
