"""Backbone adapters, chosen from the base model's config (``model_type``), never from a name."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Backbone, PreparedImage, Segment, Tokenized
from .internlm_xc2 import InternLMXC2Backbone
from .mllama import MllamaBackbone
from .qwen2_vl import Qwen2VLBackbone

__all__ = ["BACKBONES", "Backbone", "InternLMXC2Backbone", "MllamaBackbone", "PreparedImage", "Qwen2VLBackbone",
           "Segment", "Tokenized", "backbone_for", "remote_code_backbone"]

BACKBONES: dict[str, type[Backbone]] = {
    t: cls for cls in (Qwen2VLBackbone, MllamaBackbone, InternLMXC2Backbone) for t in cls.model_types
}


def backbone_for(config) -> type[Backbone]:
    """The adapter class for a transformers config, or a ``ValueError`` listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONES:
        raise ValueError(
            f"unsupported base model type {model_type!r}; supported: {sorted(BACKBONES)}"
        )
    return BACKBONES[model_type]


def remote_code_backbone(base_dir) -> type[Backbone] | None:
    """The adapter for a base model whose ``config.json`` ``model_type`` belongs to a remote-code
    model we implement natively (read as JSON: transformers would ask for ``trust_remote_code``),
    else None (the caller uses ``AutoConfig``)."""
    path = Path(base_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    cls = BACKBONES.get(model_type)
    return cls if cls is not None and cls.remote_code else None
