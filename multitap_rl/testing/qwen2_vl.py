"""A tiny offline Qwen2-VL base model and MULTI-TAP checkpoint.

``build_tiny_multitap(dir, seed)`` writes two directories:

* ``dir/base`` -- a Qwen2-VL *base model* in the layout of a hub snapshot saved by transformers
  4.4x: flat ``config.json`` (``rope_scaling`` with ``mrope``), weights with ``model.*`` /
  ``visual.*`` keys and the tied ``lm_head`` absent, a byte-level BPE tokenizer trained here with
  the Qwen special tokens, the Qwen2-VL chat template and an image-only processor config.
* ``dir/reward`` -- a MULTI-TAP checkpoint in the *released* layout: sharded safetensors with an
  index, ``backbone_model.*`` keys in the 4.46 layout and ``reward_head.{weight,bias}``.

Every builder is seeded: the same seed gives the same bytes on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError
from .files import save_sharded_fixed, write_json, write_tiny_reward_checkpoint
from .text import corpus

__all__ = [
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "build_tiny_multitap",
    "build_tiny_qwen2_vl",
    "tiny_qwen2_vl_config",
]

# The chat template shipped with Qwen/Qwen2-VL-*-Instruct (chat_template.json on the hub).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same split regex as the Qwen2 tokenizer (a published format fact, needed to mimic its behaviour).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

def _build_tokenizer(seed: int, vocab_size: int = 600):
    """A byte-level BPE trained here on generated text, with the Qwen pre-tokenizer and specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS,
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    return fast


def tiny_qwen2_vl_config(token_ids: dict[str, int], vocab_size: int, size: str = "tiny",
                         initializer_range: float = 0.02) -> dict:
    """A Qwen2-VL ``config.json`` in the flat layout transformers 4.4x wrote to the hub.

    ``size="tiny"`` is for tests (hidden 64, 2 layers, vision depth 2). ``size="small"`` has
    realistic proportions for benchmarks (hidden 384, 4 layers, vision depth 4, embed 256).
    ``initializer_range``: std of the random weights (language model and vision tower); Qwen's
    0.02 suits hidden sizes in the thousands, ~1/sqrt(hidden) keeps a narrow model's signals at
    the scale a real model's have.
    """
    dims = {
        "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, v_depth=2, v_embed=32, v_heads=4),
        "small": dict(hidden=384, inter=1024, layers=4, heads=6, kv=2, v_depth=4, v_embed=256, v_heads=4),
    }[size]
    head_dim = dims["hidden"] // dims["heads"]
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # Qwen's 16/24/24 ratio
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": dims["hidden"],
        "initializer_range": initializer_range,
        "intermediate_size": dims["inter"],
        "max_position_embeddings": 32768,
        "max_window_layers": dims["layers"],
        "model_type": "qwen2_vl",
        "num_attention_heads": dims["heads"],
        "num_hidden_layers": dims["layers"],
        "num_key_value_heads": dims["kv"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": dims["v_depth"],
            "embed_dim": dims["v_embed"],
            "mlp_ratio": 4,
            "num_heads": dims["v_heads"],
            "in_chans": 3,
            "hidden_size": dims["hidden"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "vocab_size": vocab_size,
    }
    if initializer_range != 0.02:  # the default config stays byte-identical to earlier releases
        cfg["vision_config"]["initializer_range"] = initializer_range
    return cfg


_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def _write_hub_tokenizer_config(out: Path, tokenizer) -> None:
    """Replace the transformers-5 tokenizer_config.json with the 4.4x hub form (loads in both)."""
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (out / extra).unlink(missing_ok=True)
    added = {
        str(tokenizer.convert_tokens_to_ids(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in QWEN_SPECIAL_TOKENS
    }
    write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })


def _legacy_qwen2_vl_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers-5 ``Qwen2VLForConditionalGeneration`` keys -> the 4.46 layout, tied lm_head dropped."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key.startswith("model.visual."):
            key = key[len("model.") :]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        out[key] = value.detach().clone().contiguous()
    return out


def build_tiny_qwen2_vl(out_dir: str | Path, seed: int = 0, size: str = "tiny",
                        initializer_range: float = 0.02) -> Path:
    """Write a random Qwen2-VL base model (hub 4.4x snapshot layout) to ``out_dir``; return it.
    ``initializer_range``: std of the random weights (see :func:`tiny_qwen2_vl_config`)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if not initializer_range > 0:
        raise ConfigError(f"initializer_range must be > 0, got {initializer_range}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Tokenizer, trained locally, plus the chat template.
    tokenizer = _build_tokenizer(seed)
    tokenizer.save_pretrained(out)
    _write_hub_tokenizer_config(out, tokenizer)
    write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    write_json(out / "preprocessor_config.json", _PREPROCESSOR_CONFIG)

    # 2. Config in the 4.4x flat layout; vocab padded to a multiple of 64 as Qwen does.
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = -(-len(tokenizer) // 64) * 64
    cfg = tiny_qwen2_vl_config(ids, vocab, size=size, initializer_range=initializer_range)
    write_json(out / "config.json", cfg)
    write_json(
        out / "generation_config.json",
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]],
         "pad_token_id": cfg["bos_token_id"], "do_sample": True, "temperature": 1.0, "top_k": 1,
         "top_p": 0.001, "transformers_version": "4.46.1"},
    )

    # 3. Random weights, seeded, saved with the 4.46 key names.
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(out)).float()
    save_sharded_fixed(_legacy_qwen2_vl_state_dict(model), out, n_shards=1)
    return out


def build_tiny_multitap(out_dir: str | Path, seed: int = 0, size: str = "tiny",
                        initializer_range: float = 0.02, *, name_base_model: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/base`` (Qwen2-VL base model) and ``out_dir/reward`` (released-layout
    checkpoint, see :func:`write_tiny_reward_checkpoint`; ``name_base_model=True`` also names
    ``out_dir/base`` in its ``multitap_config.json``, as ``multitap-rl tiny`` writes it)."""
    out = Path(out_dir)
    base = build_tiny_qwen2_vl(out / "base", seed=seed, size=size, initializer_range=initializer_range)
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    return base, write_tiny_reward_checkpoint(base, out / "reward", seed, hidden, name_base_model=name_base_model)
