"""Qwen2-VL (2B/7B) backbone adapter.

Numerics follow the MULTI-TAP reference (transformers 4.46.1), see docs/ARCHITECTURE.md:

* prompt: Qwen chat template; caption task = user "Describe this image." + assistant
  [image, caption]; instruction task = one assistant turn [question, image, response];
* image: RGB, resized to 560x560 with PIL bicubic, then the Qwen2-VL image processor;
* positions: ``arange`` on all three M-RoPE axes (what a plain ``forward()`` did in 4.46.1);
  ``rope="mrope"`` opts into 3-D M-RoPE for checkpoints trained that way;
* feature: the final-layer (post-norm) hidden state of the last real token. The language model
  is run without ``lm_head``; right padding and no attention mask give exactly the causal result
  for every real token, so we read each row at its own last index.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from .base import (
    Backbone,
    PreparedImage,
    Segment,
    Tokenized,
    PromptError,
    cache_argument,
    check_prefix,
    load_image_processor,
    parameters_in,
    output_cache,
    place_image_features,
    reference_messages,
)

__all__ = ["ImageOnlyQwen2VLProcessor", "Qwen2VLBackbone", "image_only_processor"]

logger = logging.getLogger(__name__)


class Qwen2VLBackbone(Backbone):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    ropes = {"reference": "arange positions, as MULTI-TAP", "mrope": "Qwen2-VL's multimodal RoPE"}
    max_aspect_ratio = 200.0  # the image processor's smart_resize limit

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        chat_template: str,
        *,
        rope: str = "reference",
        image_size: int | None = 560,
        max_length: int | None = 1024,
    ):
        # model: transformers Qwen2VLModel (.visual and .language_model, no lm_head)
        super().__init__(model, tokenizer, image_processor, chat_template, rope=rope, image_size=image_size,
                         max_length=max_length)
        cfg = model.config
        self.hidden_size = cfg.text_config.hidden_size
        self.image_token_id = cfg.image_token_id
        self.vision_end_id = cfg.vision_end_token_id
        self.merge = cfg.vision_config.spatial_merge_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if self.pad_id == self.image_token_id:
            raise ValueError("the tokenizer's pad token is the image token")
        _use_linear_patch_embed(model.visual.patch_embed)

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def build_module(config, dtype: torch.dtype):
        """An uninitialised ``Qwen2VLModel`` (no lm_head); weights are loaded right after."""
        from transformers import Qwen2VLModel

        return parameters_in(Qwen2VLModel._from_config(config, dtype=dtype), dtype)

    @classmethod
    def remap_state_dict(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Accept the transformers 4.46 (``model.*``, ``visual.*``) and 5.x
        (``model.language_model.*``, ``model.visual.*``) layouts; drop ``lm_head`` (unused)."""
        out: dict[str, torch.Tensor] = {}
        ignored: list[str] = []
        for key, value in state.items():
            if key == "lm_head.weight":
                ignored.append(key)
                continue
            new = key
            if key.startswith("model.language_model."):
                new = "language_model." + key[len("model.language_model.") :]
            elif key.startswith("model.visual."):
                new = "visual." + key[len("model.visual.") :]
            elif key.startswith("model."):
                new = "language_model." + key[len("model.") :]
            if new in out:
                raise ValueError(f"checkpoint holds both layouts of the same weight: {key!r} -> {new!r}")
            out[new] = value
        return out, ignored

    @classmethod
    def export_state_dict(cls, state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        """This module's keys in a checkpoint layout (inverse of :meth:`remap_state_dict`):
        ``"released"`` = transformers 4.46 (``model.*``, ``visual.*``); ``"multitap"`` = 5.x
        (``model.language_model.*``, ``model.visual.*``)."""
        if layout not in ("released", "multitap"):
            raise ValueError(f"layout must be 'released' or 'multitap', got {layout!r}")
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith("language_model."):
                rest = key[len("language_model.") :]
                out[("model." if layout == "released" else "model.language_model.") + rest] = value
            elif key.startswith("visual."):
                out[key if layout == "released" else "model." + key] = value
            else:
                raise ValueError(f"unexpected Qwen2-VL module key {key!r}")
        return out

    # -- preprocessing ---------------------------------------------------------------------------
    def prepare_image(self, image: Image.Image) -> PreparedImage:
        out = self.image_processor(images=[self.resize(image)], return_tensors="pt")
        grid = out["image_grid_thw"]
        n_tokens = int(grid.prod()) // self.merge**2
        return PreparedImage(
            inputs={"pixel_values": out["pixel_values"], "image_grid_thw": grid},
            num_tokens=n_tokens,
            cost=int(out["pixel_values"].shape[0]),
        )

    def prepare_pixels(self, pixels: torch.Tensor) -> PreparedImage:
        """Differentiable :meth:`prepare_image` for one (3, H, W) float image in [0, 1].

        Forward: exactly :meth:`prepare_image`'s pixel values (the same call). Backward: the
        gradient of the torch re-implementation in ``multitap_rl.differentiable`` (PIL-exact
        resize, rescale, normalise, patchify; straight-through rounding) back to ``pixels``.
        """
        from ..differentiable import qwen2_vl_pixel_values, round_ste
        from ..images import load_image

        hard = self.prepare_image(load_image(pixels.detach()))
        soft, _ = qwen2_vl_pixel_values(pixels, self.image_processor, self.image_size)
        values = round_ste(soft, hard.inputs["pixel_values"].to(soft.device))
        return PreparedImage(inputs={**hard.inputs, "pixel_values": values}, num_tokens=hard.num_tokens,
                             cost=hard.cost)

    def prompt(self, text: str, question: str | None) -> str:
        return self.tokenizer.apply_chat_template(
            reference_messages(text, question), chat_template=self.chat_template, tokenize=False
        )

    def tokenize(self, text: str, question: str | None, image: PreparedImage) -> Tokenized:
        prompt = self.prompt(text, question)
        pad = "<|image_pad|>"
        if prompt.count(pad) != 1:
            # The reference fails on such a sample (its processor cannot match the image tokens), so
            # it is this sample's error, named by the field that holds the placeholder.
            field = "question" if question is not None and pad in question else "text"
            raise PromptError(f"holds the image placeholder {pad!r}, which the prompt may hold only once (the image)",
                              field)
        prompt = prompt.replace(pad, pad * image.num_tokens)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        # The image block ends where the layout put it: the <|vision_end|> right after the one run of
        # image tokens (a literal <|vision_end|> in the user's text is just text).
        last = ids.index(self.image_token_id) + image.num_tokens - 1 if self.image_token_id in ids else -1
        if last < 0 or last + 1 >= len(ids) or ids[last] != self.image_token_id or ids[last + 1] != self.vision_end_id:
            raise ValueError("tokenized prompt has no image block ending in <|vision_end|>: tokenizer does not match "
                             "the model")
        prefix_len = last + 2
        truncated = False
        if self.max_length is not None and len(ids) > self.max_length:
            # The reference tokenizes with truncation=True, max_length=1024 (right side).
            check_prefix(len(ids), prefix_len, self.max_length, question)
            ids = ids[: self.max_length]
            truncated = True
        return Tokenized(ids=ids, prefix_len=prefix_len, truncated=truncated)

    def positions(self, tokenized: Tokenized, image: PreparedImage) -> torch.Tensor | None:
        if self.rope == "reference":
            return None
        ids = torch.tensor([tokenized.ids])
        mm = (ids == self.image_token_id).int()
        pos, _ = self.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=image.inputs["image_grid_thw"])
        return pos[:, 0]  # (3, L)

    # -- model -----------------------------------------------------------------------------------
    def vision_module(self) -> torch.nn.Module:
        return self.model.visual

    def encode_images(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        visual = self.model.visual
        dev = self.device
        pixels = torch.cat([im.inputs["pixel_values"] for im in images]).to(dev, visual.dtype)
        grid = torch.cat([im.inputs["image_grid_thw"] for im in images]).to(dev)
        merged = visual(pixels, grid_thw=grid).pooler_output  # (sum tokens, H)
        return list(torch.split(merged, [im.num_tokens for im in images]))

    def forward(self, segment: Segment, cache: Any | None = None, use_cache: bool = False):
        lm = self.model.language_model
        dev = self.device
        ids = segment.ids.to(dev)
        b, s = ids.shape
        embeds = lm.embed_tokens(ids)
        # 1. Put each row's image features on its image tokens (real positions only).
        embeds = place_image_features(embeds, ids, segment, self.image_token_id)
        # 2. Positions: arange from the segment start (reference) or explicit M-RoPE ids.
        if segment.positions is not None:
            pos = segment.positions.to(dev)
        else:
            pos = (torch.arange(s, device=dev) + segment.start).view(1, 1, s).expand(3, b, s)
        out = lm(inputs_embeds=embeds, position_ids=pos, use_cache=use_cache, **cache_argument(lm, cache))
        hidden = out.last_hidden_state  # (B, S, H), post-norm
        last = hidden[torch.arange(b, device=dev), segment.lengths.to(dev) - 1]
        return last, (output_cache(out) if use_cache else None)


def _use_linear_patch_embed(patch_embed) -> None:
    """Run the vision tower's patch embedding as the matmul it is.

    ``PatchEmbed`` is a Conv3d whose stride equals its kernel over inputs that are exactly one
    kernel each, i.e. ``x @ W.reshape(out, -1).T``. The conv path is ~7x slower on CPU; results
    agree to float rounding (~5e-6 on activations of magnitude ~3). Same weights, same gradients.
    """
    proj = patch_embed.proj

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = proj.weight
        return torch.nn.functional.linear(hidden_states.to(weight.dtype), weight.reshape(weight.shape[0], -1))

    patch_embed.forward = forward


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (which needs torchvision).

    Captioning needs only the tokenizer and the image processor; text and pixel inputs are
    identical to the full processor's. Used as TRL's ``processing_class`` for Qwen2-VL policies.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def image_only_processor(base_model) -> ImageOnlyQwen2VLProcessor:
    """The :class:`ImageOnlyQwen2VLProcessor` of a Qwen2-VL model (local directory or hub id)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    image_processor = load_image_processor(base_model)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template)
