"""A tiny offline InternLM-XComposer2.5 base model and MULTI-TAP checkpoint, for tests.

``build_tiny_internlm_xc2_multitap(dir, seed)`` writes, like ``build_tiny_mllama_multitap``:

* ``dir/base`` -- an XComposer2.5 *base model* in the layout of the hub snapshot of
  ``internlm/internlm-xcomposer2d5-7b``: ``config.json`` with ``model_type``
  ``internlmxcomposer2``, the ``auto_map`` naming the remote code (not shipped here: the
  reference check in ``tools/reference_internlm_xc2.py`` brings it), ``architectures``,
  ``attn_implementation`` "eager", ``max_length`` 16384, ``rope_scaling`` dynamic; one
  safetensors shard with the hub key names (``model.tok_embeddings``, ``model.layers.N.attention.wqkv``
  with ``Plora_A``/``Plora_B``, ``feed_forward.w1/w2/w3``, untied ``output.weight``,
  ``vit.vision_tower.vision_model.*``, ``vision_proj.0/2``, ``plora_glb_GN``, ``plora_sub_GN``);
  a SentencePiece BPE ``tokenizer.model`` trained here with the InternLM2 settings (byte
  fallback, no dummy prefix, whitespace kept, identity normaliser, digits split; ``<unk>`` 0,
  ``<s>`` 1, ``</s>`` 2; the ``[UNUSED_TOKEN_0..146]`` chat markers as user-defined pieces -- here
  right after ``</s>``, on the hub at the end of the vocabulary) and the hub's
  ``tokenizer_config.json`` form (remote ``InternLM2Tokenizer``, pad = ``</s>``).
* ``dir/clip`` -- the stand-in for ``internlm/internlm-xcomposer2d5-clip`` (the tower the remote
  ``build_mlp.py`` loads by name): a ``CLIPVisionModel`` directory in the transformers-4.x layout
  with the base model's tower weights; only the reference check reads it.
* ``dir/reward`` -- a MULTI-TAP checkpoint in the released layout (``backbone_model.*`` = the base
  weights plus seeded noise, ``output.weight`` included; ``reward_head``; two shards + index).

Tiny but structurally faithful: the vision tower keeps 560-pixel views of 14-pixel patches (the
remote code asserts 40x40 patches), one layer of width 64 (one head of 64, quick_gelu), so the
2x2-merged width is 256; the language model has width 64, 2 layers, 4 query / 2 key-value heads;
P-LoRA rank 256 as in the remote code. Weights are N(0, 0.125) (norms near 1) so that images and
texts move the scores.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from .files import save_sharded_fixed, write_json, write_tiny_reward_checkpoint
from .text import corpus

__all__ = ["INTERNLM2_CHAT_MARKERS", "build_tiny_internlm_xc2", "build_tiny_internlm_xc2_multitap",
           "tiny_internlm_xc2_config"]

INTERNLM2_CHAT_MARKERS = [f"[UNUSED_TOKEN_{i}]" for i in range(147)]  # 145/146: end / start of a turn
_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
           "image_size": 560, "patch_size": 14}
_STD = 0.125


def _build_tokenizer_model(seed: int, vocab_size: int = 800) -> bytes:
    """A SentencePiece BPE model trained here (deterministic: one thread, fixed input order)."""
    import sentencepiece as spm


    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed)), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, user_defined_symbols=INTERNLM2_CHAT_MARKERS, shuffle_input_sentence=False,
        minloglevel=2,
    )
    return out.getvalue()


def tiny_internlm_xc2_config(vocab_size: int) -> dict:
    """``config.json`` in the form of the hub's internlm/internlm-xcomposer2d5-7b, tiny sizes."""
    return {
        "architectures": ["InternLMXComposer2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
            "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_length": 16384,
        "max_position_embeddings": 24576,
        "model_type": "internlmxcomposer2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.33.2",
        "use_cache": False,
        "vocab_size": vocab_size,
    }


def _tokenizer_config() -> dict:
    return {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def _clip_config_4x() -> dict:
    """The tiny tower's ``config.json`` as transformers 4.x writes a ``CLIPVisionModel``."""
    return {"architectures": ["CLIPVisionModel"], "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu",
            "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model", "num_channels": 3, "projection_dim": 64, "torch_dtype": "float32",
            "transformers_version": "4.33.2", **_VISION}


def build_tiny_internlm_xc2(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random tiny XComposer2.5 base model (hub snapshot layout) to ``out_dir``."""
    from ..backbones.internlm_xc2 import InternLMXC2Config, InternLMXC2Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # 1. Tokenizer (SentencePiece, trained here) and its hub config.
    model_bytes = _build_tokenizer_model(seed)
    (out / "tokenizer.model").write_bytes(model_bytes)
    write_json(out / "tokenizer_config.json", _tokenizer_config())
    write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
                                                 "unk_token": "<unk>"})
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    # 2. Config (hub form) and generation config.
    cfg = tiny_internlm_xc2_config(vocab)
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                                                "transformers_version": "4.33.2"})
    # 3. Seeded weights under the hub names (our module has them), plus the untied lm_head.
    vision = {**_VISION, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
    raw = cfg
    config = InternLMXC2Config(
        hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"], vocab_size=vocab, rms_norm_eps=raw["rms_norm_eps"],
        rope_theta=float(raw["rope_theta"]), rope_scaling=raw["rope_scaling"],
        max_position_embeddings=raw["max_position_embeddings"], bias=raw["bias"], hidden_act=raw["hidden_act"],
        pad_token_id=raw["pad_token_id"], max_length=raw["max_length"], vision=vision,
    )
    torch.manual_seed(seed)
    model = InternLMXC2Model(config).float()
    gen = torch.Generator().manual_seed(seed + 11)
    state = {}
    for name, value in sorted(model.state_dict().items()):
        if name.endswith(".weight") and ("norm" in name or "layrnorm" in name):  # RMSNorm / LayerNorm scales
            t = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
        else:
            t = _STD * torch.randn(value.shape, generator=gen)
        state[name] = t.contiguous()
    state["output.weight"] = (_STD * torch.randn(vocab, raw["hidden_size"], generator=gen)).contiguous()
    save_sharded_fixed(state, out, n_shards=1)
    return out


def write_tiny_xc2_clip(base: Path, out_dir: Path) -> Path:
    """The stand-in of ``internlm/internlm-xcomposer2d5-clip``: the base model's tower weights as a
    transformers-4.x ``CLIPVisionModel`` directory (``vision_model.*`` keys)."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(base / shard)))
    pre = "vit.vision_tower."
    tower = {k[len(pre):]: v for k, v in sorted(state.items()) if k.startswith(pre)}
    save_file(tower, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "config.json", _clip_config_4x())
    return out_dir


def build_tiny_internlm_xc2_multitap(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out_dir/base`` (tiny XComposer2.5 base model), ``out_dir/clip`` (its vision tower as a
    stand-in for the hub's CLIP, for the reference check) and ``out_dir/reward`` (a released-layout
    MULTI-TAP checkpoint: the base weights plus seeded noise, and a reward head); return
    (base, reward)."""
    out = Path(out_dir)
    base = build_tiny_internlm_xc2(out / "base", seed=seed)
    write_tiny_xc2_clip(base, out / "clip")
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    return base, write_tiny_reward_checkpoint(base, out / "reward", seed, hidden)
