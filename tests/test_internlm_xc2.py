"""InternLM-XComposer2.5 specifics: selection by config without remote code, strict loading, key
layouts, the Partial-LoRA options, bad input, stage-1 training and reload. (Against the remote
code itself: test_internlm_xc2_reference.py; sharing and the differentiable path for every
backbone: test_sharing.py, test_differentiable.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from _checkpoints import load, read_state, write_checkpoint
from multitap_rl import EngineConfig, MultiTapModel
from multitap_rl.backbones import BACKBONES, InternLMXC2Backbone, remote_code_backbone
from multitap_rl.checkpoint import KNOWN_CHECKPOINTS, CheckpointError
from multitap_rl.testing import make_image, make_shapes_records

TEXTS = ["A red circle.", "Two dogs sitting on the grass near a tree."]


def test_selected_from_config_model_type_without_remote_code(tiny_xc2_dirs, tmp_path):
    """The hub config names remote code (auto_map): transformers refuses it without
    trust_remote_code; we read model_type from config.json and never run that code."""
    from transformers import AutoConfig

    base, reward = tiny_xc2_dirs
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "internlmxcomposer2" and "AutoModelForCausalLM" in cfg["auto_map"]
    assert not any(base.glob("*.py"))  # no remote code next to the tiny model either
    with pytest.raises((ValueError, OSError)):
        AutoConfig.from_pretrained(base)
    assert BACKBONES["internlmxcomposer2"] is InternLMXC2Backbone and remote_code_backbone(base) is InternLMXC2Backbone
    odd_base = shutil.copytree(base, tmp_path / "Qwen2-VL-2B-Instruct")  # the name says nothing
    model = MultiTapModel.from_pretrained(reward, base_model=odd_base, device="cpu")
    assert type(model.backbone) is InternLMXC2Backbone and model.info["family"] == "internlm_xc2"
    assert model.backbone.max_length == 16384  # "auto": interleav_wrap_chat's default, as the reference
    assert KNOWN_CHECKPOINTS["brl-xfact/Multi-TAP-internlm-xcomposer2d5-7b"] == "internlm/internlm-xcomposer2d5-7b"


def test_loading_is_strict(tiny_xc2_dirs, tmp_path):
    base, reward = tiny_xc2_dirs
    state = read_state(reward)
    dropped = "backbone_model.model.layers.1.attention.wqkv.Plora_B.weight"
    assert dropped in state and "backbone_model.output.weight" in state
    missing = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(CheckpointError, match="Plora_B"):
        MultiTapModel.from_pretrained(write_checkpoint(missing, tmp_path / "a", reward), base_model=base, device="cpu")
    extra = {**state, "backbone_model.vit.not_a_weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="not_a_weight"):
        MultiTapModel.from_pretrained(write_checkpoint(extra, tmp_path / "b", reward), base_model=base, device="cpu")
    # the untied lm_head (output.weight) is not needed: a checkpoint without it loads the same
    no_head = {k: v for k, v in state.items() if k != "backbone_model.output.weight"}
    ckpt = write_checkpoint(no_head, tmp_path / "c", reward)
    images = [make_image(0)]
    a = MultiTapModel.from_pretrained(ckpt, base_model=base, device="cpu").score(images, TEXTS[:1]).overall
    assert torch.equal(a, load(tiny_xc2_dirs).score(images, TEXTS[:1]).overall)


@pytest.mark.parametrize("layout", ["released", "multitap"])
def test_save_pretrained_round_trip(tiny_xc2_dirs, tiny_xc2_model, tmp_path, images, layout):
    out = tiny_xc2_model.save_pretrained(tmp_path / layout, layout=layout)
    keys = load_file(str(out / "model.safetensors")).keys()
    assert "backbone_model.model.layers.0.attention.wqkv.Plora_A.weight" in keys  # hub names, P-LoRA kept
    assert "backbone_model.vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in keys
    again = MultiTapModel.from_pretrained(out, base_model=tiny_xc2_dirs[0], device="cpu")
    assert again.backbone.max_length == 16384
    assert torch.equal(again.score(images[:2], TEXTS).overall, tiny_xc2_model.score(images[:2], TEXTS).overall)


def test_plora_is_unused_by_the_reference_and_applied_to_image_tokens_on_request(tiny_xc2_dirs, images):
    """plora="reference": the P-LoRA weights change nothing (MULTI-TAP drops the image mask);
    plora="image": they act on the image tokens only, and the option is saved with the model."""
    ref = load(tiny_xc2_dirs)
    before = ref.score(images[:2], TEXTS).overall
    with torch.no_grad():
        for name, p in ref.backbone.model.named_parameters():
            if "Plora_" in name:
                p.mul_(3.0)
    assert torch.equal(ref.score(images[:2], TEXTS).overall, before)
    img = load(tiny_xc2_dirs, backbone_options={"plora": "image"})
    assert img.backbone.options() == {"plora": "image"}
    assert not torch.allclose(img.score(images[:2], TEXTS).overall, before, atol=1e-4)


def test_hd_transform_crop_grid(tiny_xc2_dirs):
    """image_size=None: XComposer2.5's HD transform; the crop grid follows size and aspect ratio
    (the remote code's grids for these sizes: test_internlm_xc2_reference.py)."""
    bb = load(tiny_xc2_dirs, image_size=None).backbone
    grids = {size: bb.prepare_image(make_image(1, size=size)).inputs["crops"].tolist()
             for size in [(64, 48), (300, 900), (800, 600), (1200, 500), (3000, 400)]}
    assert grids[(64, 48)] == [1, 1] and grids[(300, 900)] == [2, 1] and grids[(800, 600)] == [2, 2]
    assert grids[(1200, 500)] == [2, 3]
    h, w = grids[(3000, 400)]
    assert h * w <= 24 and w > h
    with pytest.raises(ValueError, match="image_size"):
        load(tiny_xc2_dirs, image_size=448)


def test_bad_input_is_named(tiny_xc2_model, tiny_xc2_dirs, images):
    # (a literal <ImageHere> in a text is scored as the reference does: tests/test_fidelity_edges.py)
    with pytest.raises(ValueError, match=r"image 0: .*max_length=800"):
        load(tiny_xc2_dirs, max_length=800).score(images[:1], ["Yes."])
    with pytest.raises(ValueError, match="plora"):
        load(tiny_xc2_dirs, backbone_options={"plora": "all"})
    with pytest.raises(ValueError, match="rope"):
        load(tiny_xc2_dirs, rope="mrope")
    # a cap past the image cuts the text as the reference does (first max_length positions)
    cut = load(tiny_xc2_dirs, max_length=860).backbone
    tok = cut.tokenize(TEXTS[1], None, cut.prepare_image(images[0]))
    assert tok.truncated and len(tok.ids) == 860


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_stage1_trains_and_reloads(tiny_xc2_dirs, tmp_path, finetune):
    """Stage 1 on XComposer2.5 (CLIP frozen as in the remote code; LoRA on wqkv/wo): the saved
    model, both layouts, scores as the training forward."""
    pytest.importorskip("accelerate")
    from multitap_rl.training import train_stage1
    
    base, _ = tiny_xc2_dirs
    cfg = {"model": {"base_model": str(base), "image_size": 560, "max_length": 16384},
           "data": {"dataset": "shapes", "dataset_kwargs": {"n_train": 8, "n_eval": 4}},
           "lora": {"r": 4, "alpha": 8, "target_modules": ["wqkv", "wo"]},
           "train": {"output_dir": str(tmp_path), "batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
                     "head_learning_rate": 1e-2, "log_every": 1, "progress": False, "lr_scheduler": "constant",
                     "finetune": finetune, "freeze_vision": True, "save_layouts": ["multitap", "released"]}}
    before = MultiTapModel.from_base_model(base, device="cpu").state_dict()
    res = train_stage1(cfg)
    after = res.model.state_dict()
    clip = "backbone.model.vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    lm = "backbone.model.model.layers.0.attention.wqkv.weight"
    proj = "backbone.model.vision_proj.0.weight"
    assert torch.equal(before[clip], after[clip])  # frozen tower
    if finetune == "full":
        assert not torch.equal(before[lm], after[lm]) and not torch.equal(before[proj], after[proj])
    rows = make_shapes_records(4, seed=5, image_size=64)
    imgs, texts = [r["image"] for r in rows], [r["text"] for r in rows]
    with torch.no_grad():
        trained = torch.sigmoid(res.model(imgs, texts))
    for layout, path in res.model_dirs.items():
        again = MultiTapModel.from_pretrained(path, device="cpu")
        assert type(again.backbone) is InternLMXC2Backbone
        assert torch.allclose(again.score(imgs, texts).overall, trained, atol=1e-6, rtol=0), layout
        plain = MultiTapModel.from_pretrained(path, device="cpu", engine=EngineConfig(share_images=False,
                                                                                     share_prefix=False))
        assert torch.allclose(plain.score(imgs, texts).overall, trained, atol=1e-6, rtol=0), layout


def test_extraction_and_rewards(tiny_xc2_model, tmp_path, images):
    """Stage-2 feature extraction and the TRL reward read the same features as ``features``/``score``."""
    from multitap_rl.training.features import extract_features, load_features
    from reward_fns import multitap_reward

    rows = [{"image": images[i % 2], "text": t, "id": str(i)} for i, t in enumerate(TEXTS * 2)]
    store = extract_features(tiny_xc2_model, rows, tmp_path / "feats", schema="caption", chunk_size=3,
                             batch_size=2, progress=False)
    fs = load_features(store)
    expected = tiny_xc2_model.features([r["image"] for r in rows], [r["text"] for r in rows])
    assert torch.allclose(torch.as_tensor(fs.features).float(), expected, atol=1e-6, rtol=0)
    reward = multitap_reward(tiny_xc2_model, log_dims=False)
    got = reward(prompts=["Describe."] * 2, completions=TEXTS, image=images[:2])
    assert got == pytest.approx(tiny_xc2_model.score(images[:2], TEXTS).overall.tolist(), abs=1e-6)


def test_bfloat16_runs_the_reference_path(tiny_xc2_dirs, images):
    """bf16 (the reference's dtype on GPU): the same path, close to float32."""
    f32 = load(tiny_xc2_dirs).score(images[:2], TEXTS).overall
    bf16 = load(tiny_xc2_dirs, dtype="bf16")
    assert bf16.backbone.dtype == torch.bfloat16
    assert torch.allclose(bf16.score(images[:2], TEXTS).overall, f32, atol=0.05)


@pytest.mark.parametrize("size", [(64, 48), (600, 700), (560, 560), (1000, 300)])
def test_differentiable_pixels_are_the_reference_pixels(tiny_xc2_model, size):
    """The torch twin of the reference's image path (PIL bicubic to 560, to_tensor, bfloat16)
    gives exactly the processed pixels before the straight-through step, and carries gradients."""
    from multitap_rl.differentiable import pil_resize, to_uint8_ste
    from multitap_rl.images import load_image

    bb = tiny_xc2_model.backbone
    x = torch.rand(3, size[1], size[0], generator=torch.Generator().manual_seed(sum(size)), requires_grad=True)
    hard = bb.prepare_image(load_image(x.detach())).inputs["pixel_values"]
    soft = pil_resize(to_uint8_ste(x), (560, 560), "bicubic") / 255.0
    assert torch.equal(soft.float().bfloat16(), hard)
    out = bb.prepare_pixels(x).inputs["pixel_values"]
    assert torch.equal(out.detach(), hard)
    out.float().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
