"""A tiny Stable-Diffusion-style pipeline built offline, for tests and ``--tiny`` examples.

Real diffusers/transformers classes with tiny configs, seeded: a ``UNet2DConditionModel`` with
cross-attention (so LoRA's ``to_q/to_k/to_v/to_out.0`` targets exist), an ``AutoencoderKL``, a
``CLIPTextModel`` and a ``CLIPTokenizer`` whose BPE vocabulary is trained here on generated text,
a ``DDIMScheduler``, no safety checker. 32x32 images by default (8x8 latents): a DDIM step costs
milliseconds on one CPU thread. The weights are random: images are noise-like; the pipeline,
schedulers and trainers are the real ones.

``build_tiny_stable_diffusion(dir, seed)`` writes a ``StableDiffusionPipeline`` directory that
``StableDiffusionPipeline.from_pretrained(dir)`` (and TRL's ``DefaultDDPOStableDiffusionPipeline``)
loads; the same seed gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import require

__all__ = ["TINY_SD_PROMPTS", "build_tiny_stable_diffusion", "tiny_stable_diffusion_pipeline"]

TINY_SD_PROMPTS = [
    "a red circle on the left",
    "a green square in the center",
    "a blue triangle at the top",
    "a yellow cross on a black background",
    "a small white dog next to a tree",
    "two orange shapes on the grass",
    "a purple house under a dark sky",
    "a cat sitting on a street sign",
]

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _require_diffusers():
    require("diffusers", "diffusers", "the tiny Stable Diffusion pipeline")


def _learn_bpe(word_counts: dict[str, int], n_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE merges over words ending in ``</w>`` (most frequent pair first, ties by
    the pair itself). The ``tokenizers`` trainer breaks ties by hash order, which changes between
    runs; a seeded builder must give the same bytes every time."""
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in word_counts.items() if w}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda pr: (-pairs[pr], pr))
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def _clip_tokenizer(seed: int, n_merges: int = 300, max_length: int = 32):
    """A ``CLIPTokenizer`` (CLIP's normaliser, pre-tokeniser and ``</w>`` word ends) with a BPE
    vocabulary learned here from generated prompts, laid out as CLIP's: the byte alphabet, the
    alphabet with ``</w>``, the merges, then the two special tokens."""
    import random
    import re

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    from .text import COLORS, POSITIONS, SHAPES

    rng = random.Random(seed)
    words = COLORS + SHAPES + POSITIONS + " ".join(TINY_SD_PROMPTS).split() + [
        "photo", "painting", "of", "a", "an", "the", "with", "and", "on", "in", "at", "small", "large", "bright"]
    counts: dict[str, int] = {}
    for _ in range(2000):
        for word in re.findall(r"[a-z]+", " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).lower()):
            counts[word] = counts.get(word, 0) + 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_bpe(counts, n_merges)
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["".join(m) for m in merges] + [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_stable_diffusion_pipeline(seed: int = 0, image_size: int = 32):
    """An in-memory tiny ``StableDiffusionPipeline`` (float32, CPU, eval mode).

    Args:
        seed: seeds every component's weights and the tokenizer's training text.
        image_size: output images are ``image_size`` squared (a multiple of 4; latents are 4x smaller).
    """
    _require_diffusers()
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size % 4 or image_size < 8:
        raise ValueError(f"image_size must be a multiple of 4 and >= 8, got {image_size}")
    tokenizer = _clip_tokenizer(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, norm_num_groups=8,
        block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for module in (vae, text_encoder, unet):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_stable_diffusion(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny ``StableDiffusionPipeline`` (safetensors, no safety checker) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = tiny_stable_diffusion_pipeline(seed=seed, image_size=image_size)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
