"""Tiny offline models and fixtures for tests, examples and demos.

Nothing here touches the network. Every builder is seeded: the same seed gives the same bytes on
disk, so tests can compare numbers across runs.

* :mod:`.qwen2_vl` -- a tiny Qwen2-VL base model and released-layout MULTI-TAP checkpoint
  (:func:`build_tiny_multitap`);
* :mod:`.mllama` -- the same for Llama-3.2-Vision (:func:`build_tiny_mllama_multitap`);
* :mod:`.internlm_xc2` -- the same for InternLM-XComposer2.5 (:func:`build_tiny_internlm_xc2_multitap`);
* :mod:`.diffusion` -- a tiny Stable-Diffusion-style pipeline (diffusers imported lazily);
* :mod:`.reference` -- re-implementations of the MULTI-TAP reference forward (:class:`ReferenceScorer`,
  :class:`MllamaReferenceScorer`), the baseline of tests and benchmarks;
* :mod:`.files`, :mod:`.text`, :mod:`.images` -- checkpoint writers, the tokenizers' corpus, test images.

The shapes task (a real dataset used by stage 1 and the demo) lives in :mod:`multitap_rl.data.shapes`;
its names are re-exported here for convenience.
"""

from __future__ import annotations

from ..data.shapes import (
    SHAPE_ATTRIBUTES,
    SHAPE_COLORS,
    SHAPE_KINDS,
    SHAPE_POSITIONS,
    ShapeScene,
    draw_shapes_image,
    make_shapes_dataset,
    make_shapes_pairs,
    make_shapes_records,
    shape_caption,
)
from .diffusion import TINY_SD_PROMPTS, build_tiny_stable_diffusion, tiny_stable_diffusion_pipeline
from .images import make_image
from .internlm_xc2 import build_tiny_internlm_xc2, build_tiny_internlm_xc2_multitap
from .mllama import LLAMA32_VISION_CHAT_TEMPLATE, build_tiny_mllama, build_tiny_mllama_multitap
from .qwen2_vl import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_tiny_multitap,
    build_tiny_qwen2_vl,
    tiny_qwen2_vl_config,
)
from .reference import MllamaReferenceScorer, ReferenceScorer

__all__ = [
    "LLAMA32_VISION_CHAT_TEMPLATE",
    "MllamaReferenceScorer",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "ReferenceScorer",
    "SHAPE_ATTRIBUTES",
    "SHAPE_COLORS",
    "SHAPE_KINDS",
    "SHAPE_POSITIONS",
    "ShapeScene",
    "TINY_SD_PROMPTS",
    "build_tiny_internlm_xc2",
    "build_tiny_internlm_xc2_multitap",
    "build_tiny_mllama",
    "build_tiny_mllama_multitap",
    "build_tiny_multitap",
    "build_tiny_qwen2_vl",
    "build_tiny_stable_diffusion",
    "draw_shapes_image",
    "make_image",
    "make_shapes_dataset",
    "make_shapes_pairs",
    "make_shapes_records",
    "shape_caption",
    "tiny_qwen2_vl_config",
    "tiny_stable_diffusion_pipeline",
]
