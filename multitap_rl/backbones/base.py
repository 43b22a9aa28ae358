"""The small protocol every LVLM backbone adapter implements.

The scoring engine (``multitap_rl.scoring``) is backbone-agnostic. It asks a backbone to

1. ``prepare_image(pil) -> PreparedImage``: resize + processor for one (unique) image;
2. ``tokenize(text, question, image) -> Tokenized``: the reference prompt layout as token ids,
   with ``prefix_len`` = the number of leading tokens that depend only on the image and the
   task (not on the text being scored), so those tokens can be shared between samples;
3. ``encode_images(images) -> list``: run the vision tower once per unique image; each entry
   is that image's features in whatever form the backbone's ``forward`` consumes (a tensor of
   placeholder-token embeddings for Qwen2-VL, cross-attention states for Llama-3.2-Vision);
   the engine only stores them and hands them back per row;
4. ``forward(segment, ...) -> (feature (B, H), cache)``: run the language model over a
   right-padded batch of token segments, optionally continuing from a shared prefix cache. For
   a ``final`` segment the backbone returns each row's *feature* -- the hidden state the
   reference reads at position -1 of its padded sequence: the last real token when the
   reference pads on the left (Qwen2-VL), a pad token when it pads on the right (Llama-3.2-Vision;
   the backbone computes that token itself, see ``backbones/mllama.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["CAPTION_INSTRUCTION", "Backbone", "PreparedImage", "Segment", "Tokenized", "reference_messages"]

CAPTION_INSTRUCTION = "Describe this image."


def reference_messages(text: str, question: str | None) -> list[dict]:
    """The MULTI-TAP reference's chat messages (``prepare_input``, same for every chat-template
    backbone): caption task = user "Describe this image." + assistant [image, caption];
    instruction task = one assistant turn [question, image, response]."""
    if question is None:
        return [
            {"role": "user", "content": [{"type": "text", "text": CAPTION_INSTRUCTION}]},
            {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": text}]},
        ]
    return [{"role": "assistant", "content": [{"type": "text", "text": question}, {"type": "image"},
                                              {"type": "text", "text": text}]}]


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
    image_features: list[Any]  # per row: the image's features from ``encode_images``, or None
    positions: torch.Tensor | None = None  # backbone-specific explicit positions, (.., B, S)
    extras: dict[str, Any] = field(default_factory=dict)
    # True: each row ends where its sample ends, and forward returns its feature. False: a
    # shared-prefix segment (run for its cache only; the returned hidden state is ignored).
    final: bool = True


class Backbone(nn.Module):
    """Base class: holds the HF module(s), the tokenizer and the image processor."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    ropes: ClassVar[dict[str, str]] = {"reference": "arange positions, as MULTI-TAP"}  # accepted rope values
    # True: the engine keeps each suffix micro-batch within one prefix group, so select_cache can
    # return views of one cached row instead of copies (worth it when the cache is large per row).
    cache_views: ClassVar[bool] = False
    # The reference's prompt length cap, used when ``max_length="auto"`` (MultiTapModel.from_pretrained).
    default_max_length: ClassVar[int | None] = 1024
    # True: the base model's config.json names remote code (auto_map); the adapter reads the config
    # (``read_config(base_dir, state)``) and its tokenizer/processing (``load_processing(base_dir)``)
    # itself instead of transformers' Auto* classes.
    remote_code: ClassVar[bool] = False

    hidden_size: int

    def __init__(self, model, tokenizer, image_processor, chat_template: str, *, rope: str,
                 image_size: int | None, max_length: int | None):
        """Holds the transformers module (no ``lm_head``), the tokenizer, the image processor and
        the chat template, with the settings every backbone has; refuses a rope this backbone
        does not have and a ``max_length`` that cannot hold a prompt."""
        super().__init__()
        if rope not in self.ropes:
            accepted = "; ".join(f"{k!r} ({v})" for k, v in self.ropes.items())
            raise ValueError(f"rope must be one of {accepted} for {self.family}, got {rope!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.rope = rope
        self.image_size = image_size
        self.max_length = max_length

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

    def select_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """A new transformers ``DynamicCache`` whose row ``i`` is row ``rows[i]`` of ``cache`` (for
        prefix sharing), every layer. Rows that all come from one source row are a broadcast
        view of it (no copy); otherwise one gathered copy. The forward never writes into these
        tensors: self-attention concatenates new keys to them, cross-attention only reads."""
        from transformers import DynamicCache

        rows = rows.to(self.device)
        one = bool((rows == rows[0]).all())
        r, n = int(rows[0]), len(rows)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[r : r + 1].expand(n, *t.shape[1:]) if one else t.index_select(0, rows)

        # built from empty slices, then filled: DynamicCache(ddp_cache_data=...) would copy each tensor
        out = DynamicCache(ddp_cache_data=[(layer.keys[:1, ..., :0, :], layer.values[:1, ..., :0, :])
                                           for layer in cache.layers])
        for dst, src in zip(out.layers, cache.layers):
            dst.keys, dst.values = pick(src.keys), pick(src.values)
        return out

    # -- key layouts ---------------------------------------------------------------------------
    @classmethod
    def remap_state_dict(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Map checkpoint backbone keys onto this module's names; return (state, ignored keys)."""
        raise NotImplementedError  # pragma: no cover

    @classmethod
    def export_state_dict(cls, state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        """Map this module's keys onto a checkpoint layout ("released" or "multitap"); the
        inverse of :meth:`remap_state_dict` (used by ``MultiTapModel.save_pretrained``)."""
        raise NotImplementedError  # pragma: no cover

    def options(self) -> dict:
        """The adapter's own constructor options (beyond rope, image size, max length) that change
        its features, JSON-serialisable: saved with a checkpoint so it loads back scoring the same."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
