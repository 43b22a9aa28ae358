"""A tiny offline Llama-3.2-Vision (Mllama) base model and MULTI-TAP checkpoint, for tests.

``build_tiny_mllama_multitap(dir, seed)`` writes, like ``build_tiny_multitap`` does for Qwen2-VL:

* ``dir/base`` -- an Mllama *base model* in the layout of the hub snapshot of
  ``meta-llama/Llama-3.2-11B-Vision-Instruct`` (saved by transformers 4.45/4.46): a flat
  ``config.json`` with ``text_config``/``vision_config`` (legacy ``rope_theta``/``rope_scaling``
  keys, ``attention_heads`` in the vision config), weights with the 4.46 keys
  (``language_model.model.*``, ``language_model.lm_head.weight`` -- untied --, ``vision_model.*``,
  ``multi_modal_projector.*``); a byte-level BPE tokenizer trained here with the Llama 3 special
  tokens (256 reserved ids right after the BPE vocabulary, ``<|image|>`` = ``vocab_size``), a
  ``TemplateProcessing`` post-processor that prepends ``<|begin_of_text|>`` as the hub
  tokenizer does, pad token ``<|finetune_right_pad_id|>``, no ``padding_side`` (so: right); the
  Llama-3.2-Vision chat template; an ``MllamaImageProcessor`` config with 560-pixel tiles and
  ``max_image_tiles=4``.
* ``dir/reward`` -- a MULTI-TAP checkpoint in the released layout: sharded safetensors with an
  index, ``backbone_model.*`` in the 4.46 layout (with ``language_model.lm_head.weight``) and
  ``reward_head.{weight,bias}``.

Tiny but structurally faithful: the vision tower keeps 560-pixel tiles (a large 112-pixel patch
keeps it cheap: 26 tokens per tile), so a 560x560 image is one tile padded to four, as with the
real model; the text model interleaves cross-attention layers with self-attention layers (layer
0 is self-attention, as in the 11B model). Random init leaves every tanh gate at zero, which would
switch cross-attention off; the builder sets the gates to seeded non-zero values so the image
really reaches the text (and tests would notice a wrong cross-attention mask).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import save_sharded_fixed, write_json, write_tiny_reward_checkpoint
from .text import corpus

__all__ = [
    "LLAMA3_SPECIAL_TOKENS",
    "LLAMA32_VISION_CHAT_TEMPLATE",
    "build_tiny_mllama",
    "build_tiny_mllama_multitap",
    "tiny_mllama_config",
]

# Llama 3 special tokens in id order after the BPE vocabulary (the first 11 are named, the rest
# reserved), then <|image|> at id == text vocab_size (the embedding table has 8 extra rows).
_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{i + 2}|>" for i in range(256 - len(_NAMED))]
IMAGE_TOKEN = "<|image|>"

# The behaviour of the chat template shipped with meta-llama/Llama-3.2-11B-Vision-Instruct for
# conversations without tools: BOS, then per message "<|start_header_id|>ROLE<|end_header_id|>\n\n",
# its content (an image part renders as <|image|>, a text part as its text, untrimmed) and
# <|eot_id|>. Without images a system header with the knowledge/today dates comes first; a system
# message together with an image is an error. (Tools are not rendered here.)
LLAMA32_VISION_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if ns.has_images and system_message != '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}{%- endif %}"
    "{%- if not ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Llama 3's split regex (a published format fact, needed to mimic its tokenizer).
_LLAMA3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_image_tiles": 4,
    "processor_class": "MllamaProcessor",
    "resample": 2,
    "rescale_factor": 1 / 255,
    "size": {"height": 560, "width": 560},
}

_SUPPORTED_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


def _build_tokenizer(seed: int, bpe_size: int = 500):
    """Byte-level BPE trained on generated text + the Llama 3 specials + ``<|image|>``; returns
    (tokenizers.Tokenizer, number of BPE tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    n_bpe = tok.get_vocab_size()
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS + [IMAGE_TOKEN])
    bos = tok.token_to_id("<|begin_of_text|>")
    if bos != n_bpe or tok.token_to_id(IMAGE_TOKEN) != n_bpe + 256:
        raise RuntimeError("special token ids are not laid out as in Llama 3")
    # As the hub tokenizer: BOS prepended on encode (add_special_tokens=True, the default).
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        ),
    ])
    return tok, n_bpe


def _write_tokenizer(out: Path, tok) -> None:
    """tokenizer.json + the 4.45/4.46 hub form of tokenizer_config.json (loads in 4.46 and 5.x)."""
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in LLAMA3_SPECIAL_TOKENS + [IMAGE_TOKEN]
    }
    write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": added,
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA32_VISION_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "pad_token": "<|finetune_right_pad_id|>",
        "processor_class": "MllamaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    write_json(out / "special_tokens_map.json", {
        name: {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for name, content in (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|eot_id|>"),
                              ("pad_token", "<|finetune_right_pad_id|>"))
    })


def tiny_mllama_config(n_bpe: int) -> dict:
    """An Mllama ``config.json`` in the layout transformers 4.45/4.46 wrote to the hub.

    Text: hidden 64, 5 layers of which 1 and 3 are cross-attention, GQA 4/2 heads, Llama 3 RoPE
    scaling. Vision: 560-pixel tiles of 112-pixel patches (26 tokens with the class token), hidden
    32, 2 local + 1 global layers, output = final + 1 intermediate layer (dim 64)."""
    vocab = n_bpe + 256
    special = {t: n_bpe + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": vocab,
        "model_type": "mllama",
        "torch_dtype": "float32",
        "transformers_version": "4.46.1",
        "text_config": {
            "bos_token_id": special["<|begin_of_text|>"],
            "cross_attention_layers": [1, 3],
            "dropout": 0,
            "eos_token_id": [special["<|end_of_text|>"], special["<|eom_id|>"], special["<|eot_id|>"]],
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "intermediate_size": 128,
            "max_position_embeddings": 131072,
            "model_type": "mllama_text_model",
            "num_attention_heads": 4,
            "num_hidden_layers": 5,
            "num_key_value_heads": 2,
            "pad_token_id": special["<|finetune_right_pad_id|>"],
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "vocab_size": vocab,
        },
        "vision_config": {
            "attention_heads": 4,
            "hidden_act": "gelu",
            "hidden_size": 32,
            "image_size": 560,
            "initializer_range": 0.02,
            "intermediate_layers_indices": [1],
            "intermediate_size": 64,
            "max_num_tiles": 4,
            "model_type": "mllama_vision_model",
            "norm_eps": 1e-05,
            "num_channels": 3,
            "num_global_layers": 1,
            "num_hidden_layers": 2,
            "patch_size": 112,
            "supported_aspect_ratios": _SUPPORTED_ASPECT_RATIOS,
            "torch_dtype": "float32",
            "vision_output_dim": 64,
        },
    }


def _legacy_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers-5 ``MllamaForConditionalGeneration`` keys -> the 4.46 layout (lm_head kept:
    Mllama does not tie it)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model."):]
        elif key.startswith(("model.vision_model.", "model.multi_modal_projector.")):
            key = key[len("model."):]
        else:
            raise RuntimeError(f"unexpected Mllama key {key!r}")
        out[key] = value.detach().clone().contiguous()
    return out


def build_tiny_mllama(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random tiny Mllama base model (hub 4.45/4.46 snapshot layout) to ``out_dir``."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Tokenizer (trained locally), chat template, image processor config.
    tok, n_bpe = _build_tokenizer(seed)
    _write_tokenizer(out, tok)
    write_json(out / "chat_template.json", {"chat_template": LLAMA32_VISION_CHAT_TEMPLATE})
    write_json(out / "preprocessor_config.json", _PREPROCESSOR_CONFIG)

    # 2. Config (4.4x layout) and generation config.
    cfg = tiny_mllama_config(n_bpe)
    write_json(out / "config.json", cfg)
    text = cfg["text_config"]
    write_json(out / "generation_config.json", {
        "bos_token_id": text["bos_token_id"], "do_sample": True, "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["pad_token_id"], "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.46.1",
    })

    # 3. Seeded random weights; tanh gates set away from zero so the image reaches the text.
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(MllamaConfig.from_pretrained(out)).float()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate", "_gate")):
                param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=gen))
    save_sharded_fixed(_legacy_state_dict(model), out, n_shards=1)
    return out


def build_tiny_mllama_multitap(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out_dir/base`` (tiny Mllama base model) and ``out_dir/reward`` (a released-layout
    MULTI-TAP checkpoint: the base weights plus seeded noise, and a reward head)."""
    out = Path(out_dir)
    base = build_tiny_mllama(out / "base", seed=seed)
    hidden = json.loads((base / "config.json").read_text())["text_config"]["hidden_size"]
    return base, write_tiny_reward_checkpoint(base, out / "reward", seed, hidden)
