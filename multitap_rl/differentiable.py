"""Differentiable MULTI-TAP scores: gradients flow from the reward back to the pixels.

AlignProp/DRaFT-style trainers backpropagate a reward through the decoded image into the
diffusion model. The ordinary scoring path cannot carry gradients: it rounds the image to
``uint8``, resizes it with PIL and runs the Hugging Face image processor in numpy. This module
recomputes that preprocessing in torch with *the same numbers*:

1. ``round(x * 255)`` as the image loader does (``multitap_rl.images``);
2. PIL's resampling (``Image.resize``, bicubic by default) as two separable passes, each a
   matrix built from PIL's own 8-bit fixed-point coefficients, with PIL's rounding and clipping
   to ``uint8`` after each pass, in the installed Pillow's pass order (:func:`pil_resize`;
   bit-exact);
3. the image processor's rescale (in float64, then float32), normalisation and patchify.

Every rounding is *straight-through*: the forward value is the quantised one, the backward pass
treats it as the identity, so the gradient is that of the linear resize / rescale / normalise.
The torch pixel values are bit-identical to the processor's in the cases that matter for
text-to-image (upscales, aspect-preserving resizes); ``Qwen2VLBackbone.prepare_pixels`` still
takes the forward values from the processor itself, so scores equal :meth:`MultiTapModel.score`
(tests: <= 1e-4; measured 0.0 on the tiny model) while ``d score / d pixels`` exists.

Entry points: :func:`score_pixels` (overall + stage-2 dimensions, differentiable) and
:func:`features_from_pixels`. :class:`multitap_rl.combiner.RewardCombiner` keeps the autograd graph,
so the weighted reward is differentiable too; the reward adapter for trainers lives in
``reward_fns.differentiable``.
"""

from __future__ import annotations

import contextlib

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

from .errors import DataError, SampleError

__all__ = [
    "PIL_FILTERS",
    "check_pixels",
    "features_from_pixels",
    "pil_resize",
    "pil_resize_weights",
    "qwen2_vl_pixel_values",
    "round_ste",
    "score_pixels",
    "to_uint8_ste",
]

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images (Resample.c)


def _pillow_major() -> int:
    import PIL

    return int(PIL.__version__.split(".")[0])


_PILLOW_MAJOR = _pillow_major()


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


# PIL resampling filters: name -> (PIL.Image.Resampling value, support, kernel)
PIL_FILTERS = {"bilinear": (2, 1.0, _bilinear), "bicubic": (3, 2.0, _bicubic), "lanczos": (1, 3.0, _lanczos)}


def _filter_name(resample) -> str:
    if isinstance(resample, str):
        name = resample.lower()
    else:
        by_value = {v[0]: k for k, v in PIL_FILTERS.items()}
        name = by_value.get(int(resample), str(resample))
    if name not in PIL_FILTERS:
        raise ValueError(f"resample {resample!r} is not supported differentiably; use one of {sorted(PIL_FILTERS)}")
    return name


@lru_cache(maxsize=64)
def _weights(in_size: int, out_size: int, name: str) -> torch.Tensor:
    # Pillow's precompute_coeffs + normalize_coeffs_8bpc (src/libImaging/Resample.c), box = whole image.
    _, support, kernel = PIL_FILTERS[name]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    one = float(1 << _PRECISION_BITS)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        ks = [kernel((x - center + 0.5) * ss) for x in range(xmin, xmax)]
        total = sum(ks)
        for x, k in zip(range(xmin, xmax), ks):
            k = k / total if total != 0.0 else k
            w[xx, x] = int(k * one - 0.5) if k < 0 else int(k * one + 0.5)  # C cast: toward zero
    return w


def pil_resize_weights(in_size: int, out_size: int, resample="bicubic") -> torch.Tensor:
    """(out_size, in_size) float64: PIL's 8-bit resampling coefficients along one axis, as
    integers scaled by 2**22 (Pillow's fixed-point format). Row ``i`` holds the taps of output ``i``."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    return _weights(int(in_size), int(out_size), _filter_name(resample)).clone()


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, soft, hard):  # noqa: D102
        return hard.to(soft.dtype).clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def round_ste(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Exactly ``hard`` (cast to ``soft.dtype``) in the forward pass; the backward pass passes
    the gradient to ``soft`` unchanged (straight-through). ``hard`` gets no gradient."""
    if soft.shape != hard.shape:
        raise ValueError(f"straight-through: soft {tuple(soft.shape)} and hard {tuple(hard.shape)} differ")
    return _StraightThrough.apply(soft, hard.detach())


def to_uint8_ste(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) float in [0, 1] -> float64 holding ``round(x * 255)`` (0..255), exactly as
    ``multitap_rl.images`` turns float images into uint8 (float32 product, round half to even);
    straight-through: the backward pass sees ``x * 255``."""
    hard = torch.round(x.detach().float() * 255.0).double()
    return round_ste(x.double() * 255.0, hard)


def _pass(x: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    # x: (..., H, W) float64 integer-valued 0..255; w: (out, in) fixed-point taps along `dim`.
    one = float(1 << _PRECISION_BITS)
    moved = x.movedim(dim, -1)
    acc = moved @ w.to(x.device).t()  # exact: integer products and sums stay below 2**53
    hard = torch.clamp(torch.floor((acc.detach() + one / 2) / one), 0.0, 255.0)
    return round_ste(acc / one, hard).movedim(-1, dim)


def _vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    # Pillow < 13 always runs the horizontal pass first. Pillow 13 (src/libImaging/Resample.c,
    # ImagingResampleInner) runs the vertical pass first when the height shrinks by more than
    # twice as many pixels as the width does. The order matters: each pass rounds to uint8.
    if _PILLOW_MAJOR < 13:
        return False
    return in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)


def pil_resize(x: torch.Tensor, size: tuple[int, int], resample="bicubic") -> torch.Tensor:
    """PIL's ``Image.resize((w, h), resample)`` of an 8-bit image, differentiably.

    Args:
        x: (..., H, W) float tensor holding uint8 values (integers in 0..255), e.g. from
            :func:`to_uint8_ste`; any leading dims (channels, batch).
        size: (height, width) of the output.
        resample: "bicubic" (PIL's default for ``Image.resize``), "bilinear" or "lanczos", or the
            ``PIL.Image.Resampling`` value.

    Returns:
        (..., height, width) float64. Forward: PIL's two separable 8-bit passes with its
        fixed-point coefficients, rounding and clipping after each pass (a pass is skipped when
        that size is unchanged), in the installed Pillow's pass order -- bit-identical to Pillow
        (tests: ``tests/test_differentiable.py``, upscales, downscales and mixed, both orders).
        Backward: the linear resampling (straight-through rounding).
    """
    name = _filter_name(resample)
    if x.dim() < 2:
        raise ValueError(f"pil_resize expects (..., H, W), got shape {tuple(x.shape)}")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"pil_resize: bad output size {size}")
    in_h, in_w = (int(s) for s in x.shape[-2:])
    y = x.double()
    passes = [(-1, in_w, out_w), (-2, in_h, out_h)]
    if _vertical_first(in_h, in_w, out_h, out_w):
        passes.reverse()
    for dim, n_in, n_out in passes:
        if n_in != n_out:
            y = _pass(y, _weights(n_in, n_out, name), dim)
    return y


# -- the Qwen2-VL image processor in torch ------------------------------------------------------
def _size_get(size, key: str):
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _processor_function(family: str, name: str):
    """A helper of a transformers image processor module, wherever this transformers keeps it
    (``image_processing_pil_<family>`` in recent 5.x, ``image_processing_<family>`` before)."""
    import importlib

    for module in (f"image_processing_pil_{family}", f"image_processing_{family}"):
        try:
            found = getattr(importlib.import_module(f"transformers.models.{family}.{module}"), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise ImportError(f"transformers has no {name} for {family} image processing (version not supported)")


def qwen2_vl_pixel_values(pixels: torch.Tensor, image_processor, image_size: int | None
                          ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Differentiable twin of ``resize -> Qwen2VLImageProcessor`` for one image.

    Args:
        pixels: (3, H, W) float tensor in [0, 1] (any float dtype, any device).
        image_processor: the backbone's Qwen2-VL image processor (its rescale factor, mean/std,
            patch/merge/temporal sizes, min/max pixels and resample filter are read).
        image_size: the square size the backbone resizes to first (560 for MULTI-TAP), or None.

    Returns:
        ``(pixel_values, (t, gh, gw))``: pixel_values (gh * gw, 3 * T * P * P) float32 on
        ``pixels.device``, carrying gradients to ``pixels``; the grid as the processor reports it.
    """
    smart_resize = _processor_function("qwen2_vl", "smart_resize")

    ip = image_processor
    patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    # 1. uint8 rounding as the image loader does, then the backbone's square resize.
    x = to_uint8_ste(pixels)
    if image_size is not None:
        x = pil_resize(x, (image_size, image_size), "bicubic")
    # 2. The processor's own resize to a multiple of patch * merge within [min, max] pixels.
    if getattr(ip, "do_resize", True):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        min_px = _size_get(ip.size, "shortest_edge") or getattr(ip, "min_pixels", None)
        max_px = _size_get(ip.size, "longest_edge") or getattr(ip, "max_pixels", None)
        nh, nw = smart_resize(h, w, factor=patch * merge, min_pixels=min_px, max_pixels=max_px)
        if (nh, nw) != (h, w):
            x = pil_resize(x, (nh, nw), getattr(ip, "resample", 3))
    # 3. Rescale (float64 product, then float32, as numpy does) and normalise in float32.
    if getattr(ip, "do_rescale", True):
        x = (x * float(ip.rescale_factor)).float()
    else:
        x = x.float()
    if getattr(ip, "do_normalize", True):
        mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        x = (x - mean) / std
    # 4. Patchify: (C, H, W) -> (gh * gw, C * T * P * P), merge windows contiguous, frame repeated T times.
    c, h, w = x.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w or gh % merge or gw % merge:
        raise ValueError(f"image of {h}x{w} does not tile into {patch}-pixel patches merged {merge}x{merge}")
    p = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    p = p.unsqueeze(5).expand(*p.shape[:5], temporal, patch, patch)
    return p.reshape(gh * gw, c * temporal * patch * patch), (1, gh, gw)


# -- the Llama-3.2-Vision (Mllama) image processor in torch ---------------------------------------
def mllama_pixel_values(pixels: torch.Tensor, image_processor, image_size: int | None
                        ) -> tuple[torch.Tensor, int]:
    """Differentiable twin of ``resize -> MllamaImageProcessor`` for one image.

    Args:
        pixels: (3, H, W) float tensor in [0, 1].
        image_processor: the backbone's Mllama image processor (tile size, max tiles, resample
            filter, rescale factor, mean/std are read).
        image_size: the square size the backbone resizes to first (560 for MULTI-TAP), or None.

    Returns:
        ``(pixel_values, num_tiles)``: pixel_values (1, 1, max_tiles, 3, tile, tile) float32 on
        ``pixels.device``, carrying gradients to ``pixels``: the image resized to fit its tile
        canvas, zero-padded to it (before normalisation, as the processor does), rescaled,
        normalised, split into tiles, then zero tiles up to ``max_image_tiles``.
    """
    get_image_size_fit_to_canvas = _processor_function("mllama", "get_image_size_fit_to_canvas")
    get_optimal_tiled_canvas = _processor_function("mllama", "get_optimal_tiled_canvas")

    ip = image_processor
    tile = int(_size_get(ip.size, "height"))
    max_tiles = int(ip.max_image_tiles)
    # 1. uint8 rounding as the image loader does, then the backbone's square resize.
    x = to_uint8_ste(pixels)
    if image_size is not None:
        x = pil_resize(x, (image_size, image_size), "bicubic")
    # 2. Resize to fit the best tile canvas (PIL skips a resize to the same size), zero-pad to it.
    h, w = int(x.shape[-2]), int(x.shape[-1])
    canvas_h, canvas_w = get_optimal_tiled_canvas(image_height=h, image_width=w, max_image_tiles=max_tiles,
                                                  tile_size=tile)
    nh, nw = get_image_size_fit_to_canvas(image_height=h, image_width=w, canvas_height=canvas_h,
                                          canvas_width=canvas_w, tile_size=tile)
    if (nh, nw) != (h, w):
        x = pil_resize(x, (nh, nw), getattr(ip, "resample", 2))
    x = torch.nn.functional.pad(x, (0, canvas_w - nw, 0, canvas_h - nh))
    # 3. Rescale and normalise (float32), as for Qwen2-VL.
    x = (x * float(ip.rescale_factor)).float() if getattr(ip, "do_rescale", True) else x.float()
    if getattr(ip, "do_normalize", True):
        mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        x = (x - mean) / std
    # 4. Tiles in row-major order, then zero tiles up to max_image_tiles.
    c = x.shape[0]
    th, tw = canvas_h // tile, canvas_w // tile
    tiles = x.reshape(c, th, tile, tw, tile).permute(1, 3, 0, 2, 4).reshape(th * tw, c, tile, tile)
    if th * tw < max_tiles:
        tiles = torch.cat([tiles, tiles.new_zeros(max_tiles - th * tw, c, tile, tile)])
    return tiles[None, None], th * tw


# -- model entry points ---------------------------------------------------------------------------
def check_pixels(pixels, n: int | None = None, what: str = "image") -> torch.Tensor:
    """Validate a (B, 3, H, W) float batch in [0, 1]; raise naming the first bad sample.

    Returns ``pixels`` unchanged (a tensor). ``n``: the expected batch size, if known.
    """
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{what}s must be a (B, 3, H, W) float torch tensor in [0, 1] to carry gradients, "
                        f"got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise TypeError(f"{what}s must be a float tensor in [0, 1], got dtype {pixels.dtype}")
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise DataError(f"{what}s must have shape (B, 3, H, W), got {tuple(pixels.shape)}")
    if pixels.shape[2] == 0 or pixels.shape[3] == 0:
        raise DataError(f"{what}s are empty: shape {tuple(pixels.shape)}")
    if n is not None and pixels.shape[0] != n:
        raise DataError(f"got {pixels.shape[0]} {what}s but {n} prompts; pass one prompt per {what}")
    flat = pixels.detach().reshape(pixels.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise SampleError(i, what, "pixel values contain NaN or infinity")
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    bad = (lo < 0) | (hi > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise SampleError(i, what, f"float pixels must lie in [0, 1], got range [{float(lo[i]):.4g}, "
                                   f"{float(hi[i]):.4g}] (decode with (x / 2 + 0.5).clamp(0, 1))")
    return pixels


def features_from_pixels(model, pixels: torch.Tensor, texts: Sequence[str],
                         questions: Sequence | None = None) -> torch.Tensor:
    """(B, H) float32 last-position hidden states on the model's device, differentiable w.r.t.
    ``pixels`` (B, 3, H, W) float in [0, 1]. Same numbers as ``model.features`` (forward)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("differentiable scoring called under torch.inference_mode(); gradients cannot flow")
    check_pixels(pixels, n=len(texts) if isinstance(texts, Sequence) else None)
    bb = model.backbone
    matmuls = model._matmuls() if hasattr(model, "_matmuls") else contextlib.nullcontext()  # dtype="tf32": forward only
    with torch.enable_grad(), matmuls:
        prepared = [bb.prepare_pixels(pixels[i]) for i in range(pixels.shape[0])]
        return model.engine.features_from_prepared(prepared, texts, questions)


def score_pixels(model, pixels: torch.Tensor, texts: Sequence[str],
                 questions: Sequence | None = None) -> dict[str, torch.Tensor]:
    """Differentiable MULTI-TAP scores of (B, 3, H, W) float pixels in [0, 1].

    Returns ``{"overall": (B,), <dim>: (B,), ...}`` float32 on the model's device; each carries
    gradients to ``pixels`` (stage-2 dimensions when the heads' ``predict`` is written in torch).
    Forward values equal ``model.score(...)`` to float precision.
    """
    with torch.enable_grad():
        h = features_from_pixels(model, pixels, texts, questions)
        dims = {"overall": model.overall_from_features(h).float()}
        heads = getattr(model, "heads", None)
        if heads is not None:
            for name, values in heads.predict(h.float().cpu()).items():
                dims[name] = torch.as_tensor(values).to(model.device, torch.float32)
    return dims
