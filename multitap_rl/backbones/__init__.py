"""Backbone adapters, chosen from the base model's config (``model_type``), never from a name."""

from __future__ import annotations

from .base import Backbone, PreparedImage, Segment, Tokenized
from .mllama import MllamaBackbone
from .qwen2_vl import Qwen2VLBackbone

__all__ = ["BACKBONES", "Backbone", "MllamaBackbone", "PreparedImage", "Qwen2VLBackbone", "Segment", "Tokenized",
           "backbone_for"]

BACKBONES: dict[str, type[Backbone]] = {
    t: cls for cls in (Qwen2VLBackbone, MllamaBackbone) for t in cls.model_types
}


def backbone_for(config) -> type[Backbone]:
    """The adapter class for a transformers config, or a ``ValueError`` listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONES:
        raise ValueError(
            f"unsupported base model type {model_type!r}; supported: {sorted(BACKBONES)}"
        )
    return BACKBONES[model_type]
