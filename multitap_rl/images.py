"""Turn the many ways users hand us images into 8-bit RGB PIL images, with errors that name the sample.

Accepted per sample:
* ``PIL.Image.Image`` (any mode PIL can open; see :func:`to_rgb8`),
* a file path (``str`` or ``os.PathLike``),
* encoded bytes (``bytes``/``bytearray``/``memoryview``) or a ``{"bytes": ..., "path": ...}`` dict
  as Hugging Face ``datasets`` stores undecoded images,
* an ``(H, W, 3)`` or ``(H, W)`` ``uint8`` array or tensor (``(3, H, W)`` uint8 too; other integer
  dtypes when every value lies in [0, 255]),
* a ``(3, H, W)`` (or ``(H, W, 3)``) float tensor or array with values in ``[0, 1]`` (rounded to uint8).

Every problem is a :class:`~multitap_rl.errors.SampleError` naming the sample (``image 3: ...``):
a missing file, undecodable bytes, a decompression bomb (more pixels than :func:`max_image_pixels`),
NaN pixels, an unsupported type or shape.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import SampleError

__all__ = ["ImageLike", "image_key", "load_image", "max_image_pixels", "set_max_image_pixels", "to_rgb8"]

ImageLike = Any  # PIL.Image | str | os.PathLike | bytes | dict | np.ndarray | torch.Tensor

_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default: 1024 * 1024 * 1024 // 4 // 3
_max_pixels: int | None = None  # None: from MULTITAP_MAX_IMAGE_PIXELS, else the default


def max_image_pixels() -> int:
    """Images with more pixels than this are refused as decompression bombs (a ``SampleError``).
    Default: PIL's 89,478,485; set it with :func:`set_max_image_pixels` or the environment variable
    ``MULTITAP_MAX_IMAGE_PIXELS``."""
    if _max_pixels is not None:
        return _max_pixels
    env = os.environ.get("MULTITAP_MAX_IMAGE_PIXELS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else _DEFAULT_MAX_PIXELS


def set_max_image_pixels(n: int | None) -> None:
    """Set the decompression-bomb limit (``None``: back to the default). PIL's own global limit is
    raised with it, since PIL refuses images above twice its limit before multitap-rl sees them."""
    global _max_pixels
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"the pixel limit must be a positive int or None, got {n!r}")
    _max_pixels = n
    limit = max_image_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit


def _decode(data: bytes, index: int | None, origin: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
            img = Image.open(io.BytesIO(data))
            _check_pixels(img.width, img.height, index, origin)
            img.load()
    except Image.DecompressionBombError as exc:
        raise SampleError(index, "image", f"{origin}: refused as a decompression bomb ({exc}); raise the limit with "
                                          "multitap_rl.images.set_max_image_pixels if you trust it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, SampleError):
            raise
        raise SampleError(index, "image", f"cannot decode {origin} as an image ({exc})") from None
    return img


def _check_pixels(width: int, height: int, index: int | None, origin: str) -> None:
    limit = max_image_pixels()
    if width * height > limit:
        raise SampleError(index, "image", f"{origin}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                                          f"{limit:,} (a decompression bomb?); raise it with "
                                          "multitap_rl.images.set_max_image_pixels if you trust the image")


def _from_array(arr: np.ndarray, index: int | None) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise SampleError(index, "image", "pixel values contain NaN or infinity")
        if arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0.0 or hi > 1.0:
                raise SampleError(index, "image", f"float pixels must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise SampleError(index, "image", f"arrays must be uint8 (H, W, 3) or float in [0, 1], got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise SampleError(index, "image", f"integer pixels must lie in [0, 255] (uint8), got {arr.dtype} values "
                                              f"in [{int(arr.min())}, {int(arr.max())}]")
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise SampleError(index, "image", f"expected (H, W, 3) uint8 or (3, H, W) float, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SampleError(index, "image", f"empty image of shape {tuple(arr.shape)}")
    _check_pixels(arr.shape[1], arr.shape[0], index, "array")
    return Image.fromarray(np.ascontiguousarray(arr))


def _bits_per_sample(img: Image.Image) -> int | None:
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        return int(bits) if bits else None
    return 16 if img.format == "PNG" else None  # PNG stores 16-bit greyscale in PIL's 32-bit "I" mode


def to_rgb8(img: Image.Image, index: int | None = None) -> Image.Image:
    """An 8-bit RGB copy of ``img`` (``img`` itself when it is RGB already), scaling high-bit-depth
    modes by their range instead of clipping them (PIL's ``convert("RGB")`` clips 16-bit and 32-bit
    values at 255 and maps float values in [0, 1] to black):

    * ``I;16*`` (16-bit) and ``I`` read from a 16-bit file: ``round(v * 255 / 65535)``;
    * ``I`` (32-bit integer): ``[0, 2**31 - 1]`` onto ``[0, 255]`` (``[-2**31, 2**31 - 1]`` when
      negative values occur);
    * ``F`` (32-bit float): ``[0, 1]`` onto ``[0, 255]``; values already in ``[0, 255]`` kept;
      anything else (or NaN) is a ``SampleError``;
    * every other mode through ``convert("RGB")`` (alpha dropped, as the reference does).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise SampleError(index, "image", f"{mode} image holds NaN or infinite pixel values")
        if mode == "F":
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if lo >= 0.0 and hi <= 1.0:
                arr = arr * 255.0
            elif not (lo >= 0.0 and hi <= 255.0):
                raise SampleError(index, "image", f"float image values span [{lo:.4g}, {hi:.4g}]; expected [0, 1] "
                                                  "(or [0, 255]): normalise it first")
        elif mode.startswith("I;16") or _bits_per_sample(img) == 16:
            arr = arr * (255.0 / 65535.0)
        elif arr.size and arr.min() < 0:
            arr = (arr + 2.0**31) * (255.0 / (2.0**32 - 1))
        else:
            arr = arr * (255.0 / (2.0**31 - 1))
        gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")
    try:
        if mode == "La":  # premultiplied luminance + alpha: PIL converts it only through LA
            img = img.convert("LA")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise SampleError(index, "image", f"cannot convert a {mode} image to RGB ({exc})") from None


def load_image(obj: ImageLike, index: int | None = None) -> Image.Image:
    """Return ``obj`` as an 8-bit RGB ``PIL.Image``; raise :class:`SampleError` naming ``index``."""
    if obj is None:
        raise SampleError(index, "image", "missing (None)")
    if isinstance(obj, Image.Image):
        img = obj
    elif isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise SampleError(index, "image", f"file not found: {path}")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise SampleError(index, "image", f"cannot read {path} ({exc.strerror or exc})") from None
        img = _decode(data, index, f"file {path}")
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        img = _decode(bytes(obj), index, "bytes")
    elif isinstance(obj, dict) and ("bytes" in obj or "path" in obj):
        if obj.get("bytes") is not None:
            img = _decode(bytes(obj["bytes"]), index, "bytes")
        elif obj.get("path"):
            return load_image(obj["path"], index)
        else:
            raise SampleError(index, "image", "dict has neither 'bytes' nor 'path'")
    elif isinstance(obj, np.ndarray):
        img = _from_array(obj, index)
    elif type(obj).__module__.startswith("torch"):
        tensor = obj.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        img = _from_array(tensor.numpy(), index)
    else:
        raise SampleError(
            index, "image",
            f"unsupported type {type(obj).__name__}; pass a PIL image, a path, bytes, an (H, W, 3) uint8 array "
            "or a (3, H, W) float tensor in [0, 1]",
        )
    if img.width == 0 or img.height == 0:
        raise SampleError(index, "image", f"empty image ({img.width}x{img.height})")
    return to_rgb8(img, index)


def image_key(img: Image.Image) -> bytes:
    """A content hash: equal pixels give equal keys (used to encode duplicates once)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.digest()
