"""The small protocol every LVLM backbone adapter implements.

The scoring engine (``multitap_rl.scoring``) is backbone-agnostic. It asks a backbone to

1. ``prepare_image(pil) -> PreparedImage``: resize + processor for one (unique) image;
2. ``tokenize(text, question, image) -> Tokenized``: the reference prompt layout as token ids,
   with ``prefix_len`` = the number of leading tokens that depend only on the image and the
   task (not on the text being scored), so those tokens can be shared between samples;
3. ``encode_images(images) -> list[Tensor]``: run the vision tower once per unique image;
4. ``forward(segment, ...) -> (last hidden (B, H), cache)``: run the language model over a
   right-padded batch of token segments, optionally continuing from a shared prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Backbone", "PreparedImage", "Segment", "Tokenized"]


@dataclass
class PreparedImage:
    """Processor output for one image. ``inputs`` holds backbone-specific tensors (CPU)."""

    inputs: dict[str, torch.Tensor]
    num_tokens: int  # placeholder tokens this image occupies in the prompt (0 for cross-attention models)
    cost: int  # relative cost of encoding it (e.g. patches), for micro-batching


@dataclass
class Tokenized:
    ids: list[int]
    prefix_len: int  # ids[:prefix_len] depend only on (image, task prefix); >= 1
    truncated: bool = False


@dataclass
class Segment:
    """A right-padded batch of token segments ``ids[:, start : start + S]`` of B samples."""

    ids: torch.Tensor  # (B, S) long
    lengths: torch.Tensor  # (B,) real lengths, >= 1
    start: int  # position of the first token of the segment in the full sequence
    image_features: list[torch.Tensor | None]  # per row: the image's features, or None
    positions: torch.Tensor | None = None  # backbone-specific explicit positions, (.., B, S)
    extras: dict[str, Any] = field(default_factory=dict)


class Backbone(nn.Module):
    """Base class: holds the HF module(s), the tokenizer and the image processor."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    hidden_size: int

    # -- preprocessing (CPU) -------------------------------------------------------------
    def prepare_image(self, image) -> PreparedImage:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokenize(self, text: str, question: str | None, image: PreparedImage) -> Tokenized:  # pragma: no cover
        raise NotImplementedError

    def positions(self, tokenized: Tokenized, image: PreparedImage) -> torch.Tensor | None:
        """Explicit per-sample position ids for the whole sequence, or None for ``arange``."""
        return None

    # -- model (device) ----------------------------------------------------------------------
    def encode_images(self, images: list[PreparedImage]) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self, segment: Segment, cache: Any | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, Any | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def select_cache(self, cache: Any, rows: torch.Tensor) -> Any:  # pragma: no cover - abstract
        """A new cache whose row ``i`` is row ``rows[i]`` of ``cache`` (for prefix sharing)."""
        raise NotImplementedError

    # -- key layouts ---------------------------------------------------------------------------
    @classmethod
    def remap_state_dict(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Map checkpoint backbone keys onto this module's names; return (state, ignored keys)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
