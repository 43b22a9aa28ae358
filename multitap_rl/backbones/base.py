"""The small protocol every LVLM backbone adapter implements (see docs/ARCHITECTURE.md).

A backbone adapter holds the transformers module (no ``lm_head``), the tokenizer, the image
processor and the chat template, and turns (image, text[, question]) samples into MULTI-TAP's
feature: the final-layer hidden state the reference reads at position -1. The scoring engine
(``multitap_rl.scoring``) is backbone-agnostic; everything it, the loader, training and the
differentiable path call is declared here:

Construction (``multitap_rl.model``):
    ``build_module(config, dtype)`` (static) -- an uninitialised module the checkpoint loads into;
    ``remap_state_dict(state)`` / ``export_state_dict(state, layout)`` -- checkpoint key layouts;
    ``options()`` -- the adapter's own settings that change features (saved with checkpoints).
Preprocessing (CPU):
    ``prepare_image(pil) -> PreparedImage`` -- resize + processor for one (unique) image;
    ``prepare_pixels(pixels) -> PreparedImage`` -- the same for a float tensor, differentiable
    (forward values from ``prepare_image``; gradients through ``multitap_rl.differentiable``);
    ``tokenize(text, question, image) -> Tokenized`` -- the reference prompt layout as token ids,
    with ``prefix_len`` = the number of leading tokens that depend only on the image and the task
    (not on the text being scored), so those tokens can be shared between samples;
    ``positions(tokenized, image)`` -- explicit position ids, or None for ``arange``.
Model (device):
    ``encode_images(images) -> list`` -- the vision tower, once per unique image; each entry is that
    image's features in whatever form ``forward`` consumes (placeholder-token embeddings for
    Qwen2-VL, cross-attention states for Llama-3.2-Vision); the engine only stores them;
    ``forward(segment, cache, use_cache) -> (feature (B, H), cache)`` -- the language model over a
    right-padded batch of token segments, optionally continuing from a shared prefix cache. For a
    ``final`` segment it returns each row's *feature*: the last real token when the reference pads
    on the left (Qwen2-VL), a pad token when it pads on the right (Llama-3.2-Vision computes that
    token itself, see ``backbones/mllama.py``);
    ``select_cache(cache, rows)`` -- the prefix cache row-selected for a suffix micro-batch;
    ``vision_module()`` -- the vision tower (training freezes it on request).
Attributes: ``family``, ``model_types`` (the ``config.model_type`` values it serves), ``ropes``,
``cache_views``, ``hidden_size``, ``pad_id``, ``image_size``, ``max_length``, ``rope``.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError

__all__ = ["CAPTION_INSTRUCTION", "Backbone", "FeatureSettings", "PreparedImage", "PromptError", "Segment", "Tokenized",
           "cache_argument", "check_prefix", "load_image_processor", "output_cache", "parameters_in",
           "pin_float32_buffers", "place_image_features", "reference_messages"]

CAPTION_INSTRUCTION = "Describe this image."


@dataclass(frozen=True)
class FeatureSettings:
    """Every setting of a loaded backbone that changes its features, resolved (no ``"auto"``).

    The one record the checkpoint metadata, the heads' compatibility check, feature stores and
    the model's spec read: ``rope``, ``image_size`` (None: not resized), ``max_length`` (None:
    never truncated) and the adapter's own ``options`` (sorted ``(name, value)`` pairs)."""

    rope: str
    image_size: int | None
    max_length: int | None
    options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON form: ``{"rope", "image_size", "max_length", "backbone_options"}`` (options None when empty)."""
        return {"rope": self.rope, "image_size": self.image_size, "max_length": self.max_length,
                "backbone_options": dict(self.options) or None}


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


@lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(module: nn.Module, cache) -> dict:
    """The key/value cache as the keyword ``module.forward`` takes it: ``cache`` (transformers >=
    5.2x, where ``past_key_values`` is deprecated) or ``past_key_values`` (older 5.x)."""
    return {_cache_keyword(type(module).forward): cache}


def output_cache(out):
    """The key/value cache of a transformers model output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def place_image_features(embeds: torch.Tensor, ids: torch.Tensor, segment: Segment, image_token_id: int, *,
                         exact: bool = True) -> torch.Tensor:
    """``embeds`` (B, S, H) with each row's image-token positions (real positions only) replaced by
    that row's image features from ``segment.image_features`` (in order). ``exact``: the row must
    hold exactly as many image tokens as its image has features; else a row cut inside the image
    (truncation) keeps the first ones."""
    b, s = ids.shape
    real = torch.arange(s, device=ids.device)[None, :] < segment.lengths.to(ids.device)[:, None]
    is_img = (ids == image_token_id) & real
    if not bool(is_img.any()):
        return embeds
    rows = []
    for r in range(b):
        n = int(is_img[r].sum())
        if n == 0:
            continue
        feat = segment.image_features[r]
        got = None if feat is None else feat.shape[0]
        if got is None or (got != n if exact else got < n):
            raise ValueError(f"row {r}: {n} image tokens but image features for {got}")
        rows.append(feat[:n])
    return embeds.masked_scatter(is_img[..., None], torch.cat(rows).to(embeds.dtype))


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
    # True: each row ends where its sample ends, and forward returns its feature. False: a
    # shared-prefix segment (run for its cache only; the returned hidden state is ignored).
    final: bool = True


def load_image_processor(base_dir):
    """The base model's image processor, the PIL one (no torchvision). Some transformers 5.x releases
    gate ``AutoImageProcessor`` itself on torchvision; there the class the preprocessor config names
    is taken directly, its ``...Pil`` variant first (identical pixel values)."""
    import transformers
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(base_dir)
    except ImportError:
        cfg_path = Path(os.fspath(base_dir)) / "preprocessor_config.json"
        name = json.loads(cfg_path.read_text()).get("image_processor_type") if cfg_path.is_file() else None
        if not isinstance(name, str):
            raise
        base = name.removesuffix("Fast")
        for candidate in (base + "Pil", base):
            cls = getattr(transformers, candidate, None)
            if cls is not None:
                return cls.from_pretrained(base_dir)
        raise


class PromptError(ValueError):
    """A prompt this backbone cannot build for a sample; ``field`` names the input at fault
    (``"text"``, ``"question"`` or ``"image"``), which the engine reports as that sample's error."""

    def __init__(self, message: str, field: str = "text"):
        super().__init__(message)
        self.field = field


def check_prefix(n_ids: int, prefix_len: int, max_length: int | None, question: str | None) -> None:
    """Refuse a prompt whose part up to the end of the image alone reaches ``max_length`` (the
    reference would cut the image itself). That part holds the fixed template, the question of the
    instruction task and the image: a question is named when there is one, else the image."""
    if max_length is not None and n_ids > max_length and prefix_len >= max_length:
        where = "the question and the image" if question is not None else "the image"
        raise PromptError(f"prompt of {n_ids} tokens: the part up to the end of the image ({prefix_len} tokens: "
                          f"template, {where}) alone reaches max_length={max_length}",
                          "question" if question is not None else "image")


def parameters_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every floating parameter of ``module`` in ``dtype``, buffers left as built (float32 rotary
    tables stay float32). Some transformers releases keep the modules a model lists in float32
    when it is built in bfloat16 (transformers 5.2 does so for Llama-3.2-Vision's vision tower),
    which mixes dtypes inside one forward; the reference computes the whole model in its dtype."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


def pin_float32_buffers(module: nn.Module) -> None:
    """Keep every floating-point buffer of ``module`` (rotary ``inv_freq`` and the like) in float32,
    whatever ``module.to(dtype)`` does later: the references build these tables in float32 and round
    only what is computed from them, and a bfloat16 ``inv_freq`` moves rotary angles by whole
    radians at the positions where MULTI-TAP reads its score. Each submodule that owns such buffers
    gets a forward pre-hook that puts back its float32 values (on the buffer's device) when a cast
    changed their dtype; a buffer still in float32 is left alone (no cost, no copy)."""
    for mod in module.modules():
        names = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_floating_point()]
        if not names:
            continue
        mod.register_forward_pre_hook(_Float32Buffers(
            {n: getattr(mod, n).detach().to("cpu", torch.float32, copy=True) for n in names}))


class _Float32Buffers:
    """A forward pre-hook (picklable): put back the float32 values of buffers whose dtype a cast changed."""

    def __init__(self, saved: dict[str, torch.Tensor]):
        self.saved = saved

    def __call__(self, module: nn.Module, args) -> None:
        for name, ref in self.saved.items():
            current = getattr(module, name)
            if current is not None and current.dtype != torch.float32:
                setattr(module, name, ref.to(current.device))


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

    # Qwen2-VL's processor refuses images whose long side exceeds this multiple of the short side;
    # checked per sample (a SampleError naming it) before any processor runs. None: no limit.
    max_aspect_ratio: ClassVar[float | None] = None

    hidden_size: int
    pad_id: int

    def __init__(self, model, tokenizer, image_processor, chat_template: str, *, rope: str,
                 image_size: int | None, max_length: int | None):
        """Holds the transformers module (no ``lm_head``), the tokenizer, the image processor and
        the chat template, with the settings every backbone has; refuses a rope this backbone
        does not have and a ``max_length`` that cannot hold a prompt."""
        super().__init__()
        if rope not in self.ropes:
            accepted = "; ".join(f"{k!r} ({v})" for k, v in self.ropes.items())
            raise ConfigError(f"rope must be one of {accepted} for {self.family}, got {rope!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ConfigError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ConfigError(f"image_size must be a positive int or None (no resize), got {image_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.rope = rope
        self.image_size = image_size
        self.max_length = max_length
        pin_float32_buffers(model)

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def build_module(config, dtype: torch.dtype) -> nn.Module:  # pragma: no cover - abstract
        """An uninitialised transformers module for ``config`` (no ``lm_head``); weights follow."""
        raise NotImplementedError

    # -- preprocessing (CPU) -------------------------------------------------------------
    def check_image(self, image: Image.Image) -> None:
        """Raise ``ValueError`` (the engine names the sample) for an image this backbone cannot take."""
        w, h = image.size
        if self.image_size is None and self.max_aspect_ratio is not None \
                and max(w, h) > self.max_aspect_ratio * min(w, h):
            raise ValueError(f"{w}x{h} has an aspect ratio above {self.max_aspect_ratio:g}, which {self.family} cannot "
                             "take unresized; set image_size (the reference resizes to 560x560)")

    def resize(self, image: Image.Image) -> Image.Image:
        """PIL bicubic to ``image_size`` squared, as the reference; unchanged when it is None."""
        if self.image_size is None:
            return image
        return image.resize((self.image_size, self.image_size), Image.BICUBIC)

    def prepare_image(self, image: Image.Image) -> PreparedImage:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_pixels(self, pixels: torch.Tensor) -> PreparedImage:  # pragma: no cover - abstract
        """Differentiable :meth:`prepare_image` for one (3, H, W) float image in [0, 1]."""
        raise NotImplementedError(f"backbone {self.family!r} has no differentiable preprocessing")

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

    def vision_module(self) -> nn.Module:  # pragma: no cover - abstract
        """The vision tower (and projector, if the backbone has one outside the tower)."""
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
    def settings(self) -> FeatureSettings:
        """The settings that change this backbone's features (one typed record)."""
        return FeatureSettings(self.rope, self.image_size, self.max_length, tuple(sorted(self.options().items())))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
