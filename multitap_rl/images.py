"""Turn the many ways users hand us images into RGB PIL images, with errors that name the sample.

Accepted per sample:
* ``PIL.Image.Image`` (any mode; converted to RGB),
* a file path (``str`` or ``os.PathLike``),
* encoded bytes (``bytes``/``bytearray``/``memoryview``) or a ``{"bytes": ..., "path": ...}`` dict
  as Hugging Face ``datasets`` stores undecoded images,
* an ``(H, W, 3)`` or ``(H, W)`` ``uint8`` array or tensor (``(3, H, W)`` uint8 too),
* a ``(3, H, W)`` (or ``(H, W, 3)``) float tensor or array with values in ``[0, 1]`` (rounded to uint8).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageLike", "image_key", "load_image", "load_images"]

ImageLike = Any  # PIL.Image | str | os.PathLike | bytes | dict | np.ndarray | torch.Tensor


def _where(index: int | None) -> str:
    return f"image {index}" if index is not None else "image"


def _decode(data: bytes, index: int | None, origin: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{_where(index)}: cannot decode {origin} as an image ({exc})") from None
    return img


def _from_array(arr: np.ndarray, index: int | None) -> Image.Image:
    where = _where(index)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: pixel values contain NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where}: float pixels must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise TypeError(f"{where}: integer arrays must be uint8 (H, W, 3), got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"{where}: expected (H, W, 3) uint8 or (3, H, W) float, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where}: empty image of shape {tuple(arr.shape)}")
    return Image.fromarray(np.ascontiguousarray(arr))


def load_image(obj: ImageLike, index: int | None = None) -> Image.Image:
    """Return ``obj`` as an RGB ``PIL.Image``; raise ``ValueError``/``TypeError`` naming ``index``."""
    where = _where(index)
    if obj is None:
        raise ValueError(f"{where}: missing (None)")
    if isinstance(obj, Image.Image):
        img = obj
    elif isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise ValueError(f"{where}: file not found: {path}")
        with open(path, "rb") as fh:
            img = _decode(fh.read(), index, f"file {path}")
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        img = _decode(bytes(obj), index, "bytes")
    elif isinstance(obj, dict) and ("bytes" in obj or "path" in obj):
        if obj.get("bytes") is not None:
            img = _decode(bytes(obj["bytes"]), index, "bytes")
        elif obj.get("path"):
            return load_image(obj["path"], index)
        else:
            raise ValueError(f"{where}: dict has neither 'bytes' nor 'path'")
    elif isinstance(obj, np.ndarray):
        img = _from_array(obj, index)
    elif type(obj).__module__.startswith("torch"):
        tensor = obj.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        img = _from_array(tensor.numpy(), index)
    else:
        raise TypeError(
            f"{where}: unsupported type {type(obj).__name__}; pass a PIL image, a path, bytes, "
            "an (H, W, 3) uint8 array or a (3, H, W) float tensor in [0, 1]"
        )
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{where}: empty image ({img.width}x{img.height})")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_images(objs: Sequence[ImageLike]) -> list[Image.Image]:
    return [load_image(obj, i) for i, obj in enumerate(objs)]


def image_key(img: Image.Image) -> bytes:
    """A content hash: equal pixels give equal keys (used to encode duplicates once)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.digest()
