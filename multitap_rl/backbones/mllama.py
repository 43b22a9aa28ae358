"""Llama-3.2-Vision (``mllama``, e.g. Llama-3.2-11B-Vision-Instruct) backbone adapter.

Numerics follow the MULTI-TAP reference (``prepare_input`` + ``VLMRewardModel.forward`` under
transformers 4.46.1), measured against 4.46.1 itself (tools/reference_446_mllama.py):

* prompt: the base model's chat template (Llama-3.2-Vision) over the same messages as Qwen2-VL
  (``base.reference_messages``); the tokenizer call adds special tokens as ``MllamaProcessor``
  does, so with the hub tokenizer (whose post-processor prepends ``<|begin_of_text|>``) and a
  template that also writes it, the prompt starts with **two** BOS tokens -- as in the reference;
* image: RGB, resized to 560x560 (PIL bicubic), then the Mllama image processor: one 560-pixel
  tile, padded with blank tiles to ``max_image_tiles`` (4); the vision tower runs over all four
  and every tile's tokens are kept, because text rows before ``<|image|>`` attend uniformly to
  all of them (the reference's cross-attention "full row masked out" rule: such rows get a zero
  bias, not -inf, and only their cross-attention MLP is zeroed);
* cross-attention mask: tokens from ``<|image|>`` to the end of the padded sequence attend to
  the image's real tiles; earlier tokens as above;
* positions: ``arange`` over the padded sequence (a plain 4.46.1 ``forward()``), 1-D RoPE;
* **the feature is read at position -1 of the padded sequence.** The hub tokenizer pads on the
  *right* with ``<|finetune_right_pad_id|>``, and the reference pads to ``max_length`` (1024), so
  for every prompt shorter than that the reference's feature is the final hidden state of a PAD
  token at position ``max_length - 1`` that attends (self-attention) to all real tokens but not
  to itself or the other pads (they are masked keys), and cross-attends to the image. Its value
  depends on ``max_length``. We compute exactly that: after each row's real tokens we place one
  readout token (the pad id) with position id ``max_length - 1`` and an attention row that
  excludes itself; the other pads are never computed. A prompt of ``max_length`` tokens or more
  (truncated, as the reference does) is read at its last real token. With a tokenizer that pads
  on the left, or ``max_length=None``, the feature is the last real token's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .base import (Backbone, PreparedImage, Segment, Tokenized, cache_argument, check_prefix, output_cache,
                   parameters_in, reference_messages)

__all__ = ["MllamaBackbone", "MllamaImageFeatures"]

logger = logging.getLogger(__name__)


@dataclass
class MllamaImageFeatures:
    """What ``encode_images`` returns per image: projected vision states ``(tiles * patches, H)``
    (all ``max_image_tiles`` tiles, padding tiles included) and how many tiles are real."""

    states: torch.Tensor
    num_tiles: int


class MllamaBackbone(Backbone):
    family = "mllama"
    model_types = ("mllama",)
    # micro-batches of one prefix group, so the cached image keys/values (~26 MB per cross-attention
    # layer and row for the 11B model, bf16, 4 tiles) are broadcast views, not per-row copies
    cache_views = True
    ropes = {"reference": "Llama's 1-D RoPE over arange positions"}

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
        pad_token: str | int | None = None,
    ):
        """Args:
            model: transformers ``MllamaModel`` (``vision_model``, ``language_model``,
                ``multi_modal_projector``; no ``lm_head``).
            rope: only "reference" (Llama uses 1-D RoPE; accepted for a uniform signature).
            max_length: the reference's padded/truncated length (1024 in ``multi_objective_train.py``
                and ``run_demo.py``; ``evaluate.py`` uses 2048). With right padding it decides the
                position the feature is read at. None: no truncation, feature at the last token.
            pad_token: the token whose hidden state is read when the prompt is padded on the right
                (default: the tokenizer's pad token, ``<|finetune_right_pad_id|>`` on the hub; the
                reference's stage-1 training set it to ``eos_token``, ``<|eot_id|>``).
        """
        super().__init__(model, tokenizer, image_processor, chat_template, rope=rope, image_size=image_size,
                         max_length=max_length)
        cfg = model.config
        text = cfg.text_config
        self.hidden_size = text.hidden_size
        self.image_token_id = cfg.image_token_id
        self.cross_layers = tuple(text.cross_attention_layers)
        self.self_layer = next(i for i in range(text.num_hidden_layers) if i not in self.cross_layers)
        self.num_patches = model.vision_model.num_patches
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"tokenizer padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.bos_token = tokenizer.bos_token
        # 1. The readout token (right padding): the pad token, as the reference's processor pads.
        if pad_token is None:
            pad_id = tokenizer.pad_token_id
        elif isinstance(pad_token, str):
            pad_id = tokenizer.convert_tokens_to_ids(pad_token)
            if pad_id is None or pad_id == tokenizer.unk_token_id:
                raise ValueError(f"pad_token {pad_token!r} is not a token of this tokenizer")
        elif isinstance(pad_token, int) and not isinstance(pad_token, bool):
            pad_id = pad_token
        else:
            raise TypeError(f"pad_token must be a token string, an id or None, got {type(pad_token).__name__}")
        self.readout = self.padding_side == "right" and max_length is not None
        if self.readout and pad_id is None:
            raise ValueError(
                "the tokenizer has no pad token but pads on the right: the reference's feature is a pad "
                "token's hidden state; pass pad_token= (the hub tokenizer's is '<|finetune_right_pad_id|>')"
            )
        vocab = model.language_model.embed_tokens.num_embeddings
        if pad_id is not None and not 0 <= pad_id < vocab:
            raise ValueError(f"pad token id {pad_id} is outside the embedding table ({vocab} rows)")
        if pad_id == self.image_token_id:
            raise ValueError("the pad token is the image token")
        self.pad_id = pad_id if pad_id is not None else 0
        _match_446_intermediate_layers(model.vision_model)

    def options(self) -> dict:
        if not self.readout:
            return {}
        token = self.tokenizer.convert_ids_to_tokens(self.pad_id)
        return {"pad_token": token if isinstance(token, str) else self.pad_id}

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def build_module(config, dtype: torch.dtype):
        """An uninitialised ``MllamaModel`` (no lm_head); weights are loaded right after."""
        from transformers import MllamaModel

        return parameters_in(MllamaModel._from_config(config, dtype=dtype), dtype)

    @classmethod
    def remap_state_dict(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Accept the transformers 4.46 layout (``language_model.model.*``, ``language_model.lm_head``,
        ``vision_model.*``, ``multi_modal_projector.*``) and the 5.x layout (``model.language_model.*``,
        ``model.vision_model.*``, ``model.multi_modal_projector.*``, ``lm_head``); drop the (untied,
        unused) ``lm_head``."""
        out: dict[str, torch.Tensor] = {}
        ignored: list[str] = []
        for key, value in state.items():
            if key in ("lm_head.weight", "language_model.lm_head.weight"):
                ignored.append(key)
                continue
            if key.startswith("model."):  # 5.x
                new = key[len("model."):]
            elif key.startswith("language_model.model."):  # 4.46
                new = "language_model." + key[len("language_model.model."):]
            else:
                new = key
            if not new.startswith(("language_model.", "vision_model.", "multi_modal_projector.")):
                new = key  # let strict loading name it as unexpected
            if new in out:
                raise ValueError(f"checkpoint holds both layouts of the same weight: {key!r} -> {new!r}")
            out[new] = value
        return out, ignored

    @classmethod
    def export_state_dict(cls, state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        """This module's keys in a checkpoint layout (inverse of :meth:`remap_state_dict`):
        ``"released"`` = transformers 4.46 (``language_model.model.*``, ``vision_model.*``,
        ``multi_modal_projector.*``); ``"multitap"`` = 5.x (``model.*``). The unused ``lm_head`` is
        not written (``from_pretrained`` never needs it)."""
        if layout not in ("released", "multitap"):
            raise ValueError(f"layout must be 'released' or 'multitap', got {layout!r}")
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not key.startswith(("language_model.", "vision_model.", "multi_modal_projector.")):
                raise ValueError(f"unexpected Mllama module key {key!r}")
            if layout == "multitap":
                out["model." + key] = value
            elif key.startswith("language_model."):
                out["language_model.model." + key[len("language_model."):]] = value
            else:
                out[key] = value
        return out

    # -- preprocessing ---------------------------------------------------------------------------
    def prepare_image(self, image: Image.Image) -> PreparedImage:
        out = self.image_processor(images=[self.resize(image)], return_tensors="pt")
        pixels = out["pixel_values"]  # (1, 1, max_tiles, 3, tile, tile)
        num_tiles = out["num_tiles"]
        num_tiles = int(num_tiles[0][0]) if not torch.is_tensor(num_tiles) else int(num_tiles.flatten()[0])
        return PreparedImage(
            inputs={"pixel_values": pixels, "aspect_ratio_ids": out["aspect_ratio_ids"],
                    "aspect_ratio_mask": out["aspect_ratio_mask"], "num_tiles": torch.tensor(num_tiles)},
            num_tokens=0,  # cross-attention: the image occupies one <|image|> token, not features in the prompt
            cost=int(pixels.shape[2]) * self.num_patches,
        )

    def prepare_pixels(self, pixels: torch.Tensor) -> PreparedImage:
        """Differentiable :meth:`prepare_image` for one (3, H, W) float image in [0, 1].

        Forward: exactly :meth:`prepare_image`'s pixel values (the same call). Backward: the
        gradient of ``multitap_rl.differentiable.mllama_pixel_values`` (PIL-exact resize, pad,
        rescale, normalise, tiles; straight-through rounding) back to ``pixels``.
        """
        from ..differentiable import mllama_pixel_values, round_ste
        from ..images import load_image

        hard = self.prepare_image(load_image(pixels.detach()))
        soft, num_tiles = mllama_pixel_values(pixels, self.image_processor, self.image_size)
        target = hard.inputs["pixel_values"]
        if tuple(soft.shape) != tuple(target.shape) or num_tiles != int(hard.inputs["num_tiles"]):
            raise RuntimeError(f"differentiable preprocessing disagrees with the image processor: tiles "
                               f"{tuple(soft.shape)} x {num_tiles} vs {tuple(target.shape)} x {int(hard.inputs['num_tiles'])}")
        values = round_ste(soft, target.to(soft.device))
        return PreparedImage(inputs={**hard.inputs, "pixel_values": values}, num_tokens=hard.num_tokens,
                             cost=hard.cost)

    def prompt(self, text: str, question: str | None) -> str:
        prompt = self.tokenizer.apply_chat_template(
            reference_messages(text, question), chat_template=self.chat_template, tokenize=False
        )
        if self.bos_token and self.bos_token not in prompt:  # as MllamaProcessor (build_string_from_input)
            prompt = self.bos_token + prompt
        return prompt

    def tokenize(self, text: str, question: str | None, image: PreparedImage) -> Tokenized:
        ids = self.tokenizer(self.prompt(text, question))["input_ids"]  # special tokens: as MllamaProcessor
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise ValueError(
                f"prompt must hold exactly one <|image|> token, found {len(where)} "
                "(does the text contain '<|image|>'?)"
            )
        prefix_len = where[0] + 1  # everything up to <|image|> depends only on the image and the task
        truncated = False
        if self.max_length is not None and len(ids) > self.max_length:
            # The reference tokenizes with truncation=True, max_length (right side, special tokens counted).
            check_prefix(len(ids), prefix_len, self.max_length, question)
            ids = ids[: self.max_length]
            truncated = True
        return Tokenized(ids=ids, prefix_len=prefix_len, truncated=truncated)

    # -- model -----------------------------------------------------------------------------------
    def vision_module(self) -> torch.nn.Module:
        return torch.nn.ModuleList([self.model.vision_model, self.model.multi_modal_projector])

    def encode_images(self, images: list[PreparedImage]) -> list[MllamaImageFeatures]:
        vision = self.model.vision_model
        dev = self.device
        pixels = torch.cat([im.inputs["pixel_values"] for im in images]).to(dev, vision.dtype)
        ratio_ids = torch.cat([im.inputs["aspect_ratio_ids"] for im in images]).to(dev)
        ratio_mask = torch.cat([im.inputs["aspect_ratio_mask"] for im in images]).to(dev)
        out = vision(pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask)
        states = self.model.multi_modal_projector(out.last_hidden_state)  # (N, 1, tiles, patches, H)
        states = states.reshape(len(images), -1, self.hidden_size)
        return [MllamaImageFeatures(s, int(im.inputs["num_tiles"])) for s, im in zip(states, images)]

    def _cross_attention(self, segment: Segment, width: int, dtype: torch.dtype, dev: torch.device):
        """(bias (B, 1, S, K), row mask (B, 1, S, 1)) as the reference derives them from the
        processor's cross-attention mask: token j of a row attends the image's real tiles iff it
        sits at or after ``<|image|>``; a row attending nothing gets bias 0 (uniform attention over
        all K vision tokens) and a zero row mask (its cross-attention MLP output is dropped)."""
        feats = segment.image_features
        for r, f in enumerate(feats):
            if not isinstance(f, MllamaImageFeatures):
                raise ValueError(f"row {r}: no image features (got {type(f).__name__})")
        n_vis = feats[0].states.shape[0]
        tiles_per_image = n_vis // self.num_patches
        idx = torch.arange(width, device=dev) + segment.start
        rows = []
        for r, f in enumerate(feats):
            if f.states.shape[0] != n_vis:
                raise ValueError(f"row {r}: {f.states.shape[0]} vision tokens, row 0 has {n_vis}")
            hits = (segment.ids[r, : int(segment.lengths[r])] == self.image_token_id).nonzero()
            if len(hits):
                image_pos = segment.start + int(hits[0, 0])
            elif segment.start > 0:
                image_pos = 0  # the image token sits in the shared prefix: every token here follows it
            else:
                raise ValueError(f"row {r}: no <|image|> token in the sequence")
            after = idx >= image_pos  # (S,)
            tile_ok = torch.arange(tiles_per_image, device=dev) < f.num_tiles
            rows.append(after[:, None] & tile_ok.repeat_interleave(self.num_patches)[None, :])
        allowed = torch.stack(rows)  # (B, S, K)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        row = allowed.any(dim=-1, keepdim=True).to(dtype)
        return (bias * row)[:, None], row[:, None]

    def forward(self, segment: Segment, cache: Any | None = None, use_cache: bool = False):
        lm = self.model.language_model
        dev = self.device
        dtype = lm.embed_tokens.weight.dtype
        ids = segment.ids.to(dev)
        lengths = segment.lengths.to(dev)
        b, s = ids.shape
        ar = torch.arange(b, device=dev)
        # 1. The readout token after each row that the reference padded (right padding, shorter
        #    than max_length): position max_length - 1, attending to all but itself.
        read = torch.zeros(b, dtype=torch.bool, device=dev)
        if segment.final and self.readout:
            read = segment.start + lengths < self.max_length
        if bool(read.any()):
            if int(lengths.max()) >= s:
                ids = torch.cat([ids, torch.full((b, 1), self.pad_id, dtype=ids.dtype, device=dev)], dim=1)
                s += 1
            ids = ids.clone()
            ids[ar[read], lengths[read]] = self.pad_id
        pos = (torch.arange(s, device=dev) + segment.start).expand(b, s).clone()
        pos[ar[read], lengths[read]] = self.max_length - 1 if self.max_length is not None else 0
        # 2. Self-attention: causal over cache + segment, minus the readout's own key. Built
        #    explicitly whenever needed (readout, or a cache whose length we know per layer).
        mask = None
        if bool(read.any()) or cache is not None:
            past = 0 if cache is None else int(cache.layers[self.self_layer].keys.shape[-2])
            q = torch.arange(s, device=dev)
            allowed = (q[None, :] <= q[:, None]).expand(b, s, s).clone()
            allowed[ar[read], lengths[read], lengths[read]] = False
            allowed = torch.cat([torch.ones(b, s, past, dtype=torch.bool, device=dev), allowed], dim=-1)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
            mask = mask[:, None]
        # 3. Cross-attention: bias/row mask per row; vision states unless the cache holds them.
        cross_bias, row_mask = self._cross_attention(segment, s, dtype, dev)
        states = None
        if cache is None:
            states = torch.stack([f.states for f in segment.image_features]).to(dev, dtype)
        out = lm(
            input_ids=ids, attention_mask=mask, position_ids=pos, cross_attention_states=states,
            cross_attention_mask=cross_bias, full_text_row_masked_out_mask=row_mask, use_cache=use_cache,
            **cache_argument(lm, cache),
        )
        hidden = out.last_hidden_state  # (B, S, H), post-norm
        at = torch.where(read, lengths, lengths - 1)
        return hidden[ar, at], (output_cache(out) if use_cache else None)


@torch.no_grad()
def _match_446_intermediate_layers(vision) -> None:
    """Make the vision tower's intermediate features those of transformers 4.46.1 (and Meta's
    original encoder): ``intermediate_layers_indices`` name the *input* of local layer ``k``.

    4.46.1 stacked ``(embeddings, out_0, out_1, ...)`` and picked index ``k`` (= the output of
    layer ``k - 1``); transformers 5.x collects only the layer outputs ``(out_0, out_1, ...)`` and
    picks index ``k`` (= the output of layer ``k``), one layer later -- different cross-attention
    states for the same weights (measured: tools/reference_446_mllama.py). We probe which
    convention the installed version follows and set the indices from the config (idempotent: a
    second backbone over the same module changes nothing).
    """
    wanted = [int(k) for k in vision.config.intermediate_layers_indices]  # the config: never modified here
    n_layers = len(vision.transformer.layers)
    weight = vision.patch_embedding.weight
    probe = vision.transformer(torch.zeros(1, 8, vision.hidden_size, device=weight.device, dtype=weight.dtype))
    n_states = len(probe.hidden_states)
    if n_states == n_layers + 1:  # (embeddings, out_0, ...): already the 4.46 convention
        vision.intermediate_layers_indices = wanted
        return
    if n_states != n_layers:
        raise RuntimeError(f"Mllama vision encoder returned {n_states} hidden states for {n_layers} layers; "
                           "unknown convention, cannot match the reference's intermediate features")
    if min(wanted, default=1) < 1:
        raise ValueError(f"intermediate_layers_indices {wanted} selects the embeddings (index 0), which this "
                         "transformers version does not return")
    vision.intermediate_layers_indices = [k - 1 for k in wanted]
