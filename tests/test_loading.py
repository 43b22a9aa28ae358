"""Strict loading: every layout we promise loads to identical scores; anything else is a clear error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitap_rl import MultiTapModel
from multitap_rl.checkpoint import CheckpointError, read_state_dict
from multitap_rl.testing import build_tiny_qwen2_vl

TEXTS = ["A red circle.", "Two dogs near a tree."]


def _write(state, out, single=True):
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _ref_scores(tiny_model, images):
    return tiny_model.score(images[:2], TEXTS).overall


def test_transformers5_layout_single_file_loads_identically(tiny_dirs, tiny_model, images, tmp_path):
    base, reward = tiny_dirs
    state = read_state_dict(reward)
    renamed = {}
    for k, v in state.items():
        if k.startswith("backbone_model.model."):
            k = "backbone_model.model.language_model." + k[len("backbone_model.model."):]
        elif k.startswith("backbone_model.visual."):
            k = "backbone_model.model.visual." + k[len("backbone_model.visual."):]
        renamed[k] = v
    renamed["backbone_model.lm_head.weight"] = state["backbone_model.model.embed_tokens.weight"].clone()
    ckpt = _write(renamed, tmp_path / "v5")
    model = MultiTapModel.from_pretrained(ckpt, base_model=base, device="cpu")
    assert torch.equal(model.score(images[:2], TEXTS).overall, _ref_scores(tiny_model, images))


def test_missing_and_unexpected_keys_are_listed(tiny_dirs, tmp_path):
    base, reward = tiny_dirs
    state = read_state_dict(reward)
    dropped = "backbone_model.model.layers.1.mlp.down_proj.weight"
    del state[dropped]
    state["backbone_model.model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    ckpt = _write(state, tmp_path / "bad")
    with pytest.raises(CheckpointError) as err:
        MultiTapModel.from_pretrained(ckpt, base_model=base, device="cpu")
    msg = str(err.value)
    assert "missing keys (1): language_model.layers.1.mlp.down_proj.weight" in msg
    assert "unexpected keys (1): language_model.layers.1.mlp.extra.weight" in msg


def test_reward_head_missing_or_foreign_keys(tiny_dirs, tmp_path):
    base, reward = tiny_dirs
    state = read_state_dict(reward)
    no_head = {k: v for k, v in state.items() if not k.startswith("reward_head.")}
    with pytest.raises(CheckpointError, match="reward head must have weight and bias"):
        MultiTapModel.from_pretrained(_write(no_head, tmp_path / "a"), base_model=base, device="cpu")
    foreign = dict(state, **{"score.weight": torch.zeros(1, 4)})
    with pytest.raises(CheckpointError, match="unexpected keys .*score.weight"):
        MultiTapModel.from_pretrained(_write(foreign, tmp_path / "b"), base_model=base, device="cpu")


def test_base_model_that_does_not_fit(tiny_dirs, tmp_path):
    _, reward = tiny_dirs
    other = build_tiny_qwen2_vl(tmp_path / "small", seed=0, size="small")
    with pytest.raises(CheckpointError, match="does not fit the base model"):
        MultiTapModel.from_pretrained(reward, base_model=other, device="cpu")


def test_missing_shard_pickle_only_and_absent_dirs(tiny_dirs, tmp_path):
    base, reward = tiny_dirs
    broken = tmp_path / "broken"
    shutil.copytree(reward, broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards named in the index are missing"):
        MultiTapModel.from_pretrained(broken, base_model=base, device="cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="safetensors only"):
        MultiTapModel.from_pretrained(pickled, base_model=base, device="cpu")
    with pytest.raises(CheckpointError, match="not a hub id"):
        MultiTapModel.from_pretrained(tmp_path / "nope", base_model=base, device="cpu")
    with pytest.raises(CheckpointError, match="does not name its base model"):
        MultiTapModel.from_pretrained(reward, device="cpu")


def test_hub_id_offline_is_a_clear_error(tiny_dirs, monkeypatch):
    _, reward = tiny_dirs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not available offline .*pass a local directory"):
        MultiTapModel.from_pretrained(reward, base_model="Qwen/Qwen2-VL-2B-Instruct", device="cpu")


def test_corrupt_shard(tiny_dirs, tmp_path):
    base, reward = tiny_dirs
    broken = tmp_path / "corrupt"
    shutil.copytree(reward, broken)
    (broken / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        MultiTapModel.from_pretrained(broken, base_model=base, device="cpu")


def test_weights_come_from_the_checkpoint_not_the_base(tiny_dirs, tiny_model):
    base, reward = tiny_dirs
    ckpt = load_file(str(reward / "model-00001-of-00002.safetensors"))
    key = next(k for k in ckpt if k.startswith("backbone_model.model.layers.0"))
    name = "language_model." + key[len("backbone_model.model."):]
    assert torch.equal(tiny_model.backbone.model.state_dict()[name], ckpt[key])


def test_bfloat16_load(tiny_dirs, tiny_model, images):
    base, reward = tiny_dirs
    model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", dtype="bf16")
    assert model.backbone.dtype == torch.bfloat16 and model.reward_head.weight.dtype == torch.float32
    rotary = model.backbone.model.language_model.rotary_emb.inv_freq
    assert rotary.dtype == torch.float32
    got = model.score(images[:2], TEXTS).overall
    assert got.dtype == torch.float32
    assert torch.allclose(got, _ref_scores(tiny_model, images), atol=0.05)


def test_known_checkpoints_table_names_base_models():
    from multitap_rl.checkpoint import KNOWN_CHECKPOINTS

    assert KNOWN_CHECKPOINTS["brl-xfact/Multi-TAP-Qwen2-VL-2B"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert json.dumps(KNOWN_CHECKPOINTS)


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
@pytest.mark.parametrize("kwargs,match", [
    ({"rope": "yarn"}, r"rope must be one of 'reference'"),
    ({"max_length": 1}, "max_length must be an int >= 2 or None, got 1"),
    ({"max_length": 512.0}, "max_length must be an int"),
])
def test_settings_a_backbone_cannot_use_are_refused(family, kwargs, match, tiny_dirs, tiny_mllama_dirs):
    base, reward = tiny_dirs if family == "qwen2_vl" else tiny_mllama_dirs
    with pytest.raises(ValueError, match=match):
        MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", **kwargs)


def test_our_checkpoints_load_with_their_own_image_size_and_max_length(tiny_dirs, tmp_path, images, caplog):
    """A checkpoint saved with image_size=56, max_length=96 scores with them by default; an explicit
    value wins, with a warning that scores change."""
    import logging

    base, reward = tiny_dirs
    trained = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=56, max_length=96)
    out = trained.save_pretrained(tmp_path / "ckpt")
    again = MultiTapModel.from_pretrained(out, device="cpu")
    assert (again.backbone.image_size, again.backbone.max_length) == (56, 96)
    want = trained.score(images[:2], ["a red circle", "a tree"]).overall
    assert torch.allclose(again.score(images[:2], ["a red circle", "a tree"]).overall, want, atol=1e-6)
    with caplog.at_level(logging.WARNING, logger="multitap_rl.model"):
        other = MultiTapModel.from_pretrained(out, device="cpu", image_size=112)
    assert other.backbone.image_size == 112
    assert any("image_size=56 but is loaded with image_size=112" in m for m in caplog.messages)
    released = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu")  # no record: the reference's
    assert (released.backbone.image_size, released.backbone.max_length) == (560, 1024)
