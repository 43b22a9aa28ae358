"""InternLM-XComposer2.5 (``internlm/internlm-xcomposer2d5-7b``, ``model_type`` ``internlmxcomposer2``)
backbone adapter, native: no remote code runs here.

The base model ships remote modelling code (``auto_map``); we read its ``config.json`` ourselves,
tokenize with its SentencePiece model directly, and compute the forward with our own modules whose
parameter names are the hub's (``model.*``, ``vit.vision_tower.*``, ``vision_proj.*``,
``plora_glb_GN``, ``plora_sub_GN``; the untied ``output.weight`` is not needed and is ignored).

What the MULTI-TAP reference computes, and how each fact was verified. "Measured" means: by running
the remote code (transformers 4.33.2, the version its config names) on the tiny random model of
``multitap_rl.testing.internlm_xc2`` in ``tools/reference_internlm_xc2.py``, numbers stored in
``tests/data/reference_internlm_xc2_scores.json`` and compared in
``tests/test_internlm_xc2_reference.py``; "read" means: from the source of kaist-cvml/MULTI-TAP.

* **Query text** (read: ``multi_objective_train.py`` ``prepare_input``, the stage-2 feature
  extraction / scoring path; ``single_objective_train.py``, stage-1 training):
  caption task ``"<ImageHere>;" + caption`` -- in ``prepare_input`` the dict literal names
  ``"text_input"`` twice, ``"Describe this image. <ImageHere>;" + text`` first and
  ``"<ImageHere>;" + text`` second, and a Python dict literal keeps the last value (checked by
  evaluating it); stage-1 training uses ``"<ImageHere>;" + cand`` too, so scoring and training
  read the same layout. ``"Describe this image. <ImageHere>;"`` occurs only in
  ``modules/utils.process_data``, which no script calls. Instruction task:
  ``question + "<ImageHere>;" + response`` (no space before the image). ``evaluate.py``'s
  InternLM path calls the tokenizer with a chat template and never passes the image, so it is not
  a reproducible image-text score and is not offered.
* **Chat wrapping** (measured: token ids equal the remote ``interleav_wrap_chat``'s):
  ``"[UNUSED_TOKEN_146]user\\n" + query + "[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n"``,
  no system prompt (``meta_instruction=''``); split at ``<ImageHere>``; the part before it is
  tokenized with the BOS token ``<s>``, the part after without; each part is tokenized on its
  own (the SentencePiece model has no dummy prefix, so no space is added at part starts). The
  image's embeddings are spliced between the parts.
* **Image** (measured: the remote code's input for every case): RGB, resized to 560x560 with PIL
  bicubic (``Image.resize`` default), ``torchvision`` ``to_tensor`` -- values ``k / 255`` in float32,
  **no normalisation** -- then ``.bfloat16()`` (rounded to bfloat16 even when the model runs in
  float32). One 560x560 image is one sub-image crop plus the global view (a bicubic
  ``interpolate`` to 560, the identity here). The CLIP ViT-L/14-336-derived tower runs at 560
  (40x40 patches), its last layer's patch features (no post-layernorm, CLS dropped) are cast back
  to the **image's dtype** (bfloat16 here: measured) before the separators are added.
  HD layout (the remote ``CLIPVisionTower.forward``): each view's 40x40 features are merged 2x2
  into 20x20 tokens of width 4C; the global view gets ``plora_sub_GN`` appended to each of its 20
  rows (20 x 21 = 420 tokens), then ``plora_glb_GN`` (1 token), then the sub-images as one
  ``20h x 20w`` grid with ``plora_sub_GN`` after each row: ``(hw + 1) * 400 + 1 + (h + 1) * 20``
  tokens (841 for 560x560), then the projector (Linear, GELU, Linear).
  ``image_size=None`` selects XComposer2.5's own high-resolution path instead (what the remote
  ``encode_img`` does for an image file, ``hd_num=24`` as ``interleav_wrap_chat`` passes it):
  ``Image_transform`` (upright, scale to ``s * 560`` wide with ``s * ceil(s / ratio) <= hd_num``,
  bilinear resize, white padding at the bottom to a multiple of 560), then ``to_tensor`` and the
  CLIP mean/std normalisation in float32 -- the crop count varies with the size and aspect ratio
  (measured for several).
* **Partial LoRA** (measured): ``VLMRewardModel.forward`` keeps only ``inputs_embeds`` from
  ``interleav_wrap_chat`` and drops its image mask, so the backbone sees ``im_mask`` all False and
  the P-LoRA branches add ``B(A(x)) * 0`` -- nothing. ``plora="reference"`` (default) computes
  exactly that (the ``Plora_A``/``Plora_B`` weights are loaded, kept and saved, but unused);
  ``plora="image"`` applies them to the image tokens (``W x + B A x`` with scaling
  ``lora_alpha / lora_r = 256 / 256``), as XComposer2.5's own chat does (also measured).
* **Language model**: InternLM2 (RMSNorm in float32, GQA with the fused ``wqkv`` laid out per
  key/value head as ``[q_0 .. q_{g-1}, k, v]``, RoPE over ``arange`` positions with
  ``rope_theta``; dynamic-NTK scaling only changes anything beyond ``max_position_embeddings``,
  which we refuse; SwiGLU ``w2(silu(w1 x) * w3 x)``), causal attention, no padding.
* **Readout** (measured: ``hidden_states[-1][:, -1]``): the reference scores one sample at a time
  and pads nothing, so position -1 is the last prompt token, the ``"\\n"`` after
  ``[UNUSED_TOKEN_146]assistant``; the final-norm hidden state there.
* **Length**: ``interleav_wrap_chat``'s ``max_length=16384`` (the reference does not pass one):
  the spliced sequence is cut after that many positions (this backbone's default ``max_length``).

Exact within float32 rounding (tests: 1e-5 on scores and hidden states; measured in the test's
data file). Prefix sharing is exact: the tokens up to the end of the image depend only on the
image and the question, and the suffix is tokenized on its own by the reference too.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import ConfigError
from .base import Backbone, PreparedImage, Segment, Tokenized, check_prefix, place_image_features

__all__ = ["IMAGE_TOKEN", "InternLMXC2Backbone", "InternLMXC2Config", "InternLMXC2Model", "InternLM2Tokenizer",
           "hd_transform"]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<ImageHere>"
USER = "[UNUSED_TOKEN_146]user\n"
END = "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
IMAGE_ID = -1  # placeholder id of image positions in Tokenized.ids (never embedded)
CROP = 560  # XComposer2.5's sub-image size
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# internlm/internlm-xcomposer2d5-clip (the tower the remote build_mlp.py loads): CLIP ViT-L/14 at 560.
# What the weights cannot tell: head size 64, quick_gelu, layer-norm eps 1e-5 (the OpenAI CLIP ViTs').
CLIP_HEAD_DIM = 64
CLIP_ACT = "quick_gelu"
CLIP_EPS = 1e-5
PLORA_R, PLORA_ALPHA = 256, 256  # the remote modeling_internlm2.py's constants


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class InternLMXC2Config:
    """The fields of the hub ``config.json`` the forward needs, plus the vision tower's shape
    (read from the weights: the hub config does not hold it; see :meth:`from_files`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    bias: bool
    hidden_act: str
    pad_token_id: int | None
    max_length: int
    vision: dict
    model_type: str = "internlmxcomposer2"

    @classmethod
    def from_files(cls, base_dir: Path, state: dict[str, torch.Tensor]) -> InternLMXC2Config:
        raw = json.loads((Path(base_dir) / "config.json").read_text())
        if raw.get("model_type") != "internlmxcomposer2":
            raise ValueError(f"{base_dir}: model_type {raw.get('model_type')!r} is not 'internlmxcomposer2'")
        scaling = raw.get("rope_scaling")
        if scaling is not None and scaling.get("type") not in ("dynamic", "linear"):
            raise ValueError(f"rope_scaling type {scaling.get('type')!r} is not supported (dynamic or linear)")
        return cls(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            vocab_size=raw["vocab_size"], rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(raw.get("rope_theta", 10000)), rope_scaling=scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048), bias=raw.get("bias", True),
            hidden_act=raw.get("hidden_act", "silu"), pad_token_id=raw.get("pad_token_id"),
            max_length=raw.get("max_length", 16384), vision=vision_config_from_state(state),
        )


def vision_config_from_state(state: dict[str, torch.Tensor]) -> dict:
    """The CLIP vision config of XComposer2.5's tower from its weights: hidden, intermediate size,
    depth, patch and image size; heads = hidden / 64, quick_gelu, eps 1e-5 (see the constants)."""
    pre = "vit.vision_tower.vision_model."
    try:
        patch = state[pre + "embeddings.patch_embedding.weight"]
        pos = state[pre + "embeddings.position_embedding.weight"]
        fc1 = state[pre + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise ValueError(f"no XComposer2.5 vision tower weights ({exc.args[0]!r} missing)") from None
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    side = math.isqrt(int(pos.shape[0]) - 1)
    if side * side != pos.shape[0] - 1 or hidden % CLIP_HEAD_DIM:
        raise ValueError(f"vision tower weights of unexpected shape: position embeddings {tuple(pos.shape)}, "
                         f"hidden {hidden}")
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(pre) + r"encoder\.layers\.(\d+)\.", k)))
    return {"hidden_size": hidden, "intermediate_size": int(fc1.shape[0]), "num_hidden_layers": layers,
            "num_attention_heads": hidden // CLIP_HEAD_DIM, "patch_size": patch_size, "image_size": side * patch_size,
            "hidden_act": CLIP_ACT, "layer_norm_eps": CLIP_EPS, "num_channels": 3}


# -- tokenizer ---------------------------------------------------------------------------------------
class InternLM2Tokenizer:
    """The base model's ``tokenizer.model`` (SentencePiece, no dummy prefix) used directly, as the
    remote ``InternLM2Tokenizer`` does under transformers 4.46.1 (what MULTI-TAP ran): the text is
    split at its special tokens (``<s>``, ``</s>``, ``<unk>``; the whitespace next to them is kept --
    transformers 4.33, the version the remote code names, stripped it), each piece encoded by
    SentencePiece (the ``[UNUSED_TOKEN_*]`` chat markers are user-defined pieces, kept whole); BOS
    prepended when asked. Checked against 4.46.1 with ``tools/tokenizer_internlm2_446.py``."""

    def __init__(self, base_dir: Path):
        import sentencepiece as spm

        base_dir = Path(base_dir)
        cfg_path = base_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.sp = spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))

        def tok(name, default):
            v = cfg.get(name, default)
            return v.get("content") if isinstance(v, dict) else v

        self.bos_token, self.eos_token = tok("bos_token", "<s>"), tok("eos_token", "</s>")
        self.unk_token, self.pad_token = tok("unk_token", "<unk>"), tok("pad_token", "</s>")
        self.bos_token_id = self.sp.piece_to_id(self.bos_token)
        self.pad_token_id = self.sp.piece_to_id(self.pad_token) if self.pad_token else None
        self.add_bos_token = cfg.get("add_bos_token", True)
        self.padding_side = cfg.get("padding_side", "right")
        specials = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t]
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(set(specials), key=len, reverse=True)) + ")")
        self.chat_template = cfg.get("chat_template")

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode(self, text: str, add_bos: bool) -> list[int]:
        parts = self._split.split(text)  # special tokens at odd indices, the text between them as it is
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ([self.bos_token_id] if add_bos and self.add_bos_token else []) + ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) >= 0])


# -- image preprocessing -----------------------------------------------------------------------------
def hd_transform(image: Image.Image, hd_num: int = 24) -> Image.Image:
    """XComposer2.5's ``Image_transform``: transpose to landscape, scale to ``s * 560`` wide (the
    largest ``s`` with ``s * ceil(s / ratio) <= hd_num``, at most ``ceil(width / 560)``), bilinear
    resize (torchvision on a PIL image = PIL bilinear), pad the bottom with white to a multiple of
    560, transpose back."""
    width, height = image.size
    trans = width < height
    if trans:
        image = image.transpose(Image.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale = min(math.ceil(width / CROP), scale - 1)
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    target = math.ceil(new_h / CROP) * CROP
    if target != new_h:
        canvas = Image.new(image.mode, (new_w, target), (255, 255, 255))
        canvas.paste(image, (0, 0))
        image = canvas
    if trans:
        image = image.transpose(Image.TRANSPOSE)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision ``to_tensor`` of an 8-bit RGB image: (3, H, W) float32 ``k / 255``."""
    import numpy as np

    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255)


# -- modules (hub parameter names) ----------------------------------------------------------------------
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class PartialLoRALinear(nn.Linear):
    """``W x + b``, plus ``Plora_B(Plora_A(x)) * alpha / r`` on the rows ``im_mask`` selects (none
    when ``im_mask`` is None)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.Plora_A = nn.Linear(in_features, PLORA_R, bias=False)
        self.Plora_B = nn.Linear(PLORA_R, out_features, bias=False)
        self.lora_scaling = PLORA_ALPHA / PLORA_R

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if im_mask is not None and bool(im_mask.any()):
            delta = self.Plora_B(self.Plora_A(x[im_mask])) * self.lora_scaling
            out = out.index_put((im_mask,), out[im_mask] + delta)
        return out


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: InternLMXC2Config):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.wqkv = PartialLoRALinear(cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, cfg.bias)
        self.wo = PartialLoRALinear(self.heads * self.head_dim, cfg.hidden_size, cfg.bias)

    def forward(self, x, cos, sin, past, im_mask):
        b, s, _ = x.shape
        qkv = self.wqkv(x, im_mask).view(b, s, self.kv_heads, self.groups + 2, self.head_dim)
        q = qkv[..., : self.groups, :].reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        new = (k, v)
        kk = k.repeat_interleave(self.groups, dim=1)
        vv = v.repeat_interleave(self.groups, dim=1)
        p = kk.shape[2] - s
        if p == 0:
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        else:  # query i sits at p + i: it sees every cached key and the segment's keys up to itself
            allowed = torch.ones(s, p + s, dtype=torch.bool, device=x.device).tril(diagonal=p)
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.wo(out, im_mask), new


class FeedForward(nn.Module):
    def __init__(self, cfg: InternLMXC2Config):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (InternLM2 uses silu)")
        self.w1 = PartialLoRALinear(cfg.hidden_size, cfg.intermediate_size, False)
        self.w3 = PartialLoRALinear(cfg.hidden_size, cfg.intermediate_size, False)
        self.w2 = PartialLoRALinear(cfg.intermediate_size, cfg.hidden_size, False)

    def forward(self, x, im_mask):
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: InternLMXC2Config):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, past, im_mask):
        a, new = self.attention(self.attention_norm(h), cos, sin, past, im_mask)
        h = h + a
        return h + self.feed_forward(self.ffn_norm(h), im_mask), new


class InternLM2Model(nn.Module):
    def __init__(self, cfg: InternLMXC2Config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False


class VisionTower(nn.Module):
    """``vision_tower.vision_model`` = the CLIP vision transformer: hub keys
    ``vit.vision_tower.vision_model.*`` as the remote code's 4.x ``CLIPVisionModel`` wrote them.
    (Recent transformers' ``CLIPVisionModel`` *is* that transformer; earlier 5.x releases wrap it as
    ``.vision_model``, which is taken here, so the keys are the same under both.)"""

    def __init__(self, vision: dict):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.vision_tower = nn.Module()
        # eager attention: the 4.33 CLIP's arithmetic (bmm, softmax), so the features the reference
        # rounds to bfloat16 are the same float32 numbers and no rounding flips (measured)
        clip = CLIPVisionModel(CLIPVisionConfig(**vision, attn_implementation="eager"))
        self.vision_tower.vision_model = getattr(clip, "vision_model", clip)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 560, 560) -> (N, 1600, C): the last encoder layer's output (no post-layernorm), CLS dropped."""
        vm = self.vision_tower.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        return vm.encoder(inputs_embeds=h).last_hidden_state[:, 1:]


class InternLMXC2Model(nn.Module):
    """XComposer2.5 without ``output`` (lm_head): ``model`` (InternLM2), ``vit``, ``vision_proj``
    and the two separator embeddings, under the hub's parameter names."""

    base_model_prefix = ""  # read by peft/transformers' weight-conversion scan when LoRA is injected

    def __init__(self, cfg: InternLMXC2Config):
        super().__init__()
        self.config = cfg
        width = 4 * cfg.vision["hidden_size"]
        self.model = InternLM2Model(cfg)
        self.vit = VisionTower(cfg.vision)
        self.vision_proj = nn.Sequential(nn.Linear(width, cfg.hidden_size), nn.GELU(),
                                         nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))

    @property
    def vision_model(self) -> nn.Module:  # the vision tower proper (stage 1's freeze_vision)
        return self.vit

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.model.gradient_checkpointing = True
        self._ckpt_kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin (B, 1, S, D) as the remote rotary cache: float32 ``t * inv_freq``, cat, cos/sin,
        and only the result rounded to ``dtype``. ``inv_freq`` is computed here in float32 on every
        call, not kept as a buffer: ``module.to(bfloat16)`` would round a buffer, which moves cos/sin
        by up to ~1 at head size 128 near position 1000, where MULTI-TAP reads its score."""
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
        t = positions.float()
        if cfg.rope_scaling is not None and cfg.rope_scaling["type"] == "linear":
            t = t / cfg.rope_scaling["factor"]
        freqs = t[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, past=None, im_mask=None):
        """The language model over ``embeds`` (B, S, H) at ``positions`` (B, S), continuing from
        ``past`` (:class:`KVCache`); returns (final-norm hidden states, the new :class:`KVCache`)."""
        cos, sin = self.rope(positions, embeds.dtype)
        h = embeds
        new = []
        for i, layer in enumerate(self.model.layers):
            lp = (past.layers[i].keys, past.layers[i].values) if past is not None else None
            if self.model.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                h, kv = checkpoint(layer, h, cos, sin, lp, im_mask, **getattr(self, "_ckpt_kwargs", {}))
            else:
                h, kv = layer(h, cos, sin, lp, im_mask)
            new.append(LayerKV(*kv))
        return self.model.norm(h), KVCache(new)

    def encode_image(self, pixels: torch.Tensor, crops: tuple[int, int]) -> torch.Tensor:
        """One image's (tokens, hidden) embeddings, as ``img2emb`` (``vit`` + ``vision_proj``)."""
        out = self.view_tokens(pixels, crops)
        proj = self.vision_proj
        return proj(out.to(proj[0].weight.dtype))

    def view_tokens(self, pixels: torch.Tensor, crops: tuple[int, int]) -> torch.Tensor:
        """(tokens, 4C): the remote ``CLIPVisionTower.forward`` output for one image (merged CLIP
        features of the global view and the sub-image grid, with the separators)."""
        h, w = crops
        _, height, width = pixels.shape
        if (height, width) != (h * CROP, w * CROP):
            raise ValueError(f"pixels {tuple(pixels.shape)} do not hold {h}x{w} crops of {CROP}")
        img = pixels[None]
        sub = img.reshape(1, 3, h, CROP, w, CROP).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, CROP, CROP)
        glb = F.interpolate(img.float(), size=(CROP, CROP), mode="bicubic").to(sub.dtype)
        views = torch.cat([glb, sub])
        feats = self.vit.patch_features(views.to(self.vit.dtype)).to(views.dtype)  # back to the image's dtype
        n, c = feats.shape[1], feats.shape[2]
        side = math.isqrt(n)
        if side != 40:
            raise ValueError(f"vision tower gives {n} patches per view, XComposer2.5 expects 40x40")
        half = side // 2
        merged = feats.reshape(-1, half, 2, half, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, half, half, 4 * c)
        dtype = torch.promote_types(merged.dtype, self.plora_sub_GN.dtype)  # torch.cat promotes, as the reference
        sub_gn, glb_gn = self.plora_sub_GN.to(dtype), self.plora_glb_GN.to(dtype)
        g = torch.cat([merged[:1].to(dtype), sub_gn.expand(1, half, 1, 4 * c)], dim=2).reshape(1, -1, 4 * c)
        s = merged[1:].reshape(1, h, w, half, half, 4 * c).permute(0, 1, 3, 2, 4, 5).reshape(1, h * half, w * half, 4 * c)
        s = torch.cat([s.to(dtype), sub_gn.expand(1, h * half, 1, 4 * c)], dim=2).reshape(1, -1, 4 * c)
        return torch.cat([g, glb_gn, s], dim=1)[0]


@dataclass
class LayerKV:
    keys: torch.Tensor  # (B, kv_heads, L, head_dim), after RoPE
    values: torch.Tensor


@dataclass
class KVCache:
    """The language model's cached keys/values, one :class:`LayerKV` per layer (``.layers``, as a
    transformers ``DynamicCache`` exposes them)."""

    layers: list[LayerKV]


def num_image_tokens(h: int, w: int) -> int:
    return (h * w + 1) * 400 + 1 + (h + 1) * 20


# The released XComposer2.5 modelling code gives every P-LoRA linear three more adapters for its
# write/web modes; a MULTI-TAP checkpoint built on it carries them, unused.
_UNUSED_ADAPTER = re.compile(
    r"model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3))\.lora_(sft|dpo|web)_[AB]\.weight")


# -- the adapter ----------------------------------------------------------------------------------------
class InternLMXC2Backbone(Backbone):
    family = "internlm_xc2"
    model_types = ("internlmxcomposer2",)
    ropes = {"reference": "InternLM2's 1-D RoPE over arange positions"}
    remote_code: ClassVar[bool] = True  # config, tokenizer and processing read here, not through transformers' Auto*
    default_max_length: ClassVar[int | None] = 16384  # interleav_wrap_chat's default, what the reference used
    plora_modes = ("reference", "image")

    def __init__(self, model: InternLMXC2Model, tokenizer: InternLM2Tokenizer, image_processor=None,
                 chat_template: str = "", *, rope: str = "reference", image_size: int | None = 560,
                 max_length: int | None = 16384, plora: str = "reference", hd_num: int = 24):
        """Args:
            model: :class:`InternLMXC2Model` with the checkpoint's weights.
            image_size: 560 (the reference: resize to 560x560, ``to_tensor``, bfloat16, one crop);
                None: XComposer2.5's own high-resolution transform (``hd_num`` crops at most).
            max_length: the spliced sequence is cut after this many positions (the reference:
                16384, ``interleav_wrap_chat``'s default); None: never.
            plora: "reference" (image mask dropped, as MULTI-TAP's forward: P-LoRA unused) or
                "image" (P-LoRA on the image tokens, XComposer2.5's own chat).
        """
        super().__init__(model, tokenizer, image_processor, chat_template, rope=rope, image_size=image_size,
                         max_length=max_length)
        if image_size not in (560, None):
            raise ConfigError(f"image_size must be 560 (the reference) or None (XComposer2.5's HD transform) for "
                              f"InternLM-XComposer2.5, got {image_size!r}")
        if plora not in self.plora_modes:
            raise ConfigError(f"plora must be one of {self.plora_modes}, got {plora!r}")
        if isinstance(hd_num, bool) or not isinstance(hd_num, int) or hd_num < 1:
            raise ConfigError(f"hd_num must be a positive int, got {hd_num!r}")
        self.plora, self.hd_num = plora, hd_num
        self.hidden_size = model.config.hidden_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_token_id = IMAGE_ID

    def options(self) -> dict:
        out = {}
        if self.plora != "reference":
            out["plora"] = self.plora
        if self.hd_num != 24:
            out["hd_num"] = self.hd_num
        return out

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def read_config(cls, base_dir: Path, state: dict[str, torch.Tensor]) -> InternLMXC2Config:
        """The base model's ``config.json`` read directly (its ``auto_map`` names remote code we do
        not run); the vision tower's shape from the checkpoint's weights."""
        return InternLMXC2Config.from_files(base_dir, state)

    @classmethod
    def load_processing(cls, base_dir: Path):
        """(tokenizer, image processor, chat template): the SentencePiece model; no processor (the
        reference uses ``to_tensor``); the chat wrapping is ``interleav_wrap_chat``'s, built in."""
        return InternLM2Tokenizer(base_dir), None, ""

    @staticmethod
    def build_module(config: InternLMXC2Config, dtype: torch.dtype):
        return InternLMXC2Model(config).to(dtype)

    @classmethod
    def remap_state_dict(cls, state):
        """Hub key names as they are; drop, and report as ignored, exactly the weights scoring never
        uses: the untied ``output.weight`` (lm_head) and XComposer2.5's extra Partial-LoRA adapters
        ``lora_{sft,dpo,web}_{A,B}`` on each P-LoRA linear (its write/web modes only; MULTI-TAP's
        forward never selects them). Any other unknown key stays and the strict loader refuses it."""
        out, ignored = {}, []
        for key, value in state.items():
            if key == "output.weight" or _UNUSED_ADAPTER.fullmatch(key):
                ignored.append(key)
            else:
                out[key] = value
        return out, ignored

    @classmethod
    def export_state_dict(cls, state, layout: str):
        """Both layouts use the hub's names (there is no transformers-native XComposer2.5 layout)."""
        if layout not in ("released", "multitap"):
            raise ValueError(f"layout must be 'released' or 'multitap', got {layout!r}")
        bad = [k for k in state if not k.startswith(("model.", "vit.", "vision_proj.", "plora_"))]
        if bad:
            raise ValueError(f"unexpected InternLM-XComposer2.5 module key {bad[0]!r}")
        return dict(state)

    # -- preprocessing ---------------------------------------------------------------------------
    def vision_module(self) -> nn.Module:
        return self.model.vit

    def view(self, image: Image.Image) -> Image.Image:
        """The image the pixels are taken from: 560x560 bicubic (reference), or the HD transform."""
        image = image.convert("RGB")
        if self.image_size is None:
            return hd_transform(image, self.hd_num)
        return image.resize((self.image_size, self.image_size), Image.BICUBIC)

    def _prepared(self, pixels: torch.Tensor) -> PreparedImage:
        h, w = pixels.shape[1] // CROP, pixels.shape[2] // CROP
        return PreparedImage(inputs={"pixel_values": pixels, "crops": torch.tensor([h, w])},
                             num_tokens=num_image_tokens(h, w), cost=(h * w + 1) * 1600)

    def prepare_image(self, image: Image.Image) -> PreparedImage:
        x = to_tensor(self.view(image))
        if self.image_size is None:  # the remote vis_processor: to_tensor + CLIP normalisation, float32
            mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
            x = (x - mean) / std
        else:  # MULTI-TAP: to_tensor(...).bfloat16(), no normalisation
            x = x.bfloat16()
        return self._prepared(x)

    def prepare_pixels(self, pixels: torch.Tensor) -> PreparedImage:
        """Differentiable :meth:`prepare_image` for one (3, H, W) float image in [0, 1] (reference
        path, ``image_size=560``). Forward: exactly :meth:`prepare_image`'s bfloat16 pixels.
        Backward: through ``multitap_rl.differentiable.pil_resize`` (PIL-exact bicubic) and
        ``/ 255``, the uint8 and bfloat16 roundings straight-through. The HD path
        (``image_size=None``) is not offered: its padding size and crop count jump with the image
        size, and its bilinear resize would need its own PIL twin."""
        from ..differentiable import pil_resize, round_ste, to_uint8_ste
        from ..images import load_image

        if self.image_size is None:
            raise NotImplementedError("differentiable preprocessing needs image_size=560 (the reference path)")
        hard = self.prepare_image(load_image(pixels.detach()))
        soft = pil_resize(to_uint8_ste(pixels), (self.image_size, self.image_size), "bicubic") / 255.0
        values = round_ste(soft.float(), hard.inputs["pixel_values"].to(soft.device).float())
        return PreparedImage(inputs={**hard.inputs, "pixel_values": values.to(torch.bfloat16)},
                             num_tokens=hard.num_tokens, cost=hard.cost)

    def parts(self, text: str, question: str | None) -> list[str]:
        """The wrapped prompt split at ``<ImageHere>`` as ``interleav_wrap_chat`` splits it: the
        image follows the first part; the others are text. A text or question holding a literal
        ``<ImageHere>`` is scored as the reference scores it: the literal disappears, the image
        stays at the first placeholder and each remaining part is tokenized on its own (the
        reference prints a warning; we log one)."""
        parts = (USER + (question or "") + IMAGE_TOKEN + ";" + text + END).split(IMAGE_TOKEN)
        if len(parts) > 2:
            logger.warning("a text or question holds %r: scored as the reference does (the literal is dropped, the "
                           "image goes at the first one)", IMAGE_TOKEN)
        return parts

    def tokenize(self, text: str, question: str | None, image: PreparedImage) -> Tokenized:
        first, *rest = self.parts(text, question)
        head = self.tokenizer.encode(first, add_bos=True)
        tail = [t for part in rest if part for t in self.tokenizer.encode(part, add_bos=False)]
        ids = head + [IMAGE_ID] * image.num_tokens + tail
        prefix_len = len(head) + image.num_tokens
        truncated = False
        if self.max_length is not None and len(ids) > self.max_length:
            check_prefix(len(ids), prefix_len, self.max_length, question)
            ids, truncated = ids[: self.max_length], True
        limit = self.model.config.max_position_embeddings
        if self.model.config.rope_scaling is not None and len(ids) > limit:
            raise ValueError(f"prompt of {len(ids)} positions exceeds max_position_embeddings={limit}, where the "
                             "reference's scaled RoPE changes")
        return Tokenized(ids=ids, prefix_len=prefix_len, truncated=truncated)

    # -- model -----------------------------------------------------------------------------------
    def encode_images(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        dev = self.device
        out = []
        for im in images:
            h, w = (int(v) for v in im.inputs["crops"])
            out.append(self.model.encode_image(im.inputs["pixel_values"].to(dev), (h, w)))
        return out

    def forward(self, segment: Segment, cache: Any | None = None, use_cache: bool = False):
        m = self.model
        dev = self.device
        ids = segment.ids.to(dev)
        lengths = segment.lengths.to(dev)
        b, s = ids.shape
        embeds = m.model.tok_embeddings(ids.clamp(min=0))
        # a sequence cut inside the image keeps its first embeddings
        embeds = place_image_features(embeds, ids, segment, IMAGE_ID, exact=False)
        pos = (torch.arange(s, device=dev) + segment.start).expand(b, s)
        real = torch.arange(s, device=dev)[None, :] < lengths[:, None]
        im_mask = (ids == IMAGE_ID) & real if self.plora == "image" else None
        hidden, kv = m.run(embeds, pos, cache, im_mask)
        last = hidden[torch.arange(b, device=dev), lengths - 1]
        return last, (kv if use_cache else None)

    def select_cache(self, cache, rows: torch.Tensor):
        """Row ``i`` = row ``rows[i]`` of every layer's (k, v): a broadcast view when all rows are
        one source row, else one gathered copy (the forward only concatenates to them)."""
        rows = rows.to(self.device)
        one = bool((rows == rows[0]).all())
        r, n = int(rows[0]), len(rows)

        def pick(t):
            return t[r : r + 1].expand(n, *t.shape[1:]) if one else t.index_select(0, rows)

        return KVCache([LayerKV(pick(layer.keys), pick(layer.values)) for layer in cache.layers])
