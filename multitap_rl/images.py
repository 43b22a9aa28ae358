"""Turn the many ways users hand us images into 8-bit RGB PIL images, with errors that name the sample.

Accepted per sample:
* ``PIL.Image.Image`` (any mode PIL can open; see :func:`to_rgb8`),
* a file path (``str`` or ``os.PathLike``),
* encoded bytes (``bytes``/``bytearray``/``memoryview``) or a ``{"bytes": ..., "path": ...}`` dict
  as Hugging Face ``datasets`` stores undecoded images,
* an ``(H, W, 3)`` or ``(H, W)`` ``uint8`` array or tensor (``(3, H, W)`` uint8 too; other integer
  dtypes by the integer rule below),
* a ``(3, H, W)`` (or ``(H, W, 3)``) float tensor or array with values in ``[0, 1]`` (rounded to uint8).

**The integer rule.** Integer pixels whose bit depth nothing states -- PIL modes ``I`` (32-bit) and
``I;16*`` (16-bit) made in memory (``Image.fromarray(int32_array)``, ``.convert("I")``), a TIFF that
stores 8- or 16-bit data in 32-bit samples, and int16/uint16/int32/int64 arrays or integer tensors --
are read by the range of their values, so no content is thrown away:

* every value in ``[0, 255]``: 8-bit, kept as is;
* every value in ``[0, 65535]`` (some above 255): 16-bit, ``round(v * 255 / 65535)``;
* anything else (a negative value, or one above 65535): a ``SampleError`` that gives the range found
  and how to convert it, e.g. ``Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))``.

A file that declares 16-bit samples (a 16-bit PNG, a TIFF with ``BitsPerSample`` 16) is scaled by
``255 / 65535`` whatever its values: the file states its range.

Every problem is a :class:`~multitap_rl.errors.SampleError` naming the sample (``image 3: ...``):
a missing file, undecodable bytes, a decompression bomb (more pixels than :func:`max_image_pixels`),
NaN pixels, integer pixels outside the integer rule, an unsupported type or shape. A bad
``MULTITAP_MAX_IMAGE_PIXELS`` is a :class:`~multitap_rl.errors.ConfigError` when the limit is read.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, MultiTapError, SampleError

__all__ = ["ImageLike", "image_key", "load_image", "max_image_pixels", "set_max_image_pixels", "to_rgb8"]

ImageLike = Any  # PIL.Image | str | os.PathLike | bytes | dict | np.ndarray | torch.Tensor

_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default: 1024 * 1024 * 1024 // 4 // 3
_max_pixels: int | None = None  # None: from MULTITAP_MAX_IMAGE_PIXELS, else the default
MAX_PIXELS_ENV = "MULTITAP_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """Images with more pixels than this are refused as decompression bombs (a ``SampleError``).
    Default: PIL's 89,478,485; set it with :func:`set_max_image_pixels` or the environment variable
    ``MULTITAP_MAX_IMAGE_PIXELS`` (a positive integer; anything else is a ``ConfigError``)."""
    if _max_pixels is not None:
        return _max_pixels
    env = _env_max_pixels()
    return _DEFAULT_MAX_PIXELS if env is None else env


def _env_max_pixels() -> int | None:
    """``MULTITAP_MAX_IMAGE_PIXELS`` as a positive int, ``None`` when unset or blank; a
    :class:`ConfigError` naming the variable and its value for anything else."""
    raw = os.environ.get(MAX_PIXELS_ENV, "")
    text = raw.strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive integer; set it to a number of pixels "
                          f"(e.g. {MAX_PIXELS_ENV}=200000000) or unset it for the default {_DEFAULT_MAX_PIXELS:,}")
    return int(text)


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
    max_image_pixels()  # a bad limit setting is a ConfigError, never an undecodable image
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
        if isinstance(exc, MultiTapError):
            raise
        raise SampleError(index, "image", f"cannot decode {origin} as an image: {_undecodable(data, exc)}") from None
    return img


def _undecodable(data: bytes, exc: Exception) -> str:
    """What was given, for a decode error: its size and first bytes when PIL recognised no format
    (PIL's own text names only an in-memory buffer object), else PIL's reason."""
    first = f"first bytes: {data[:16]!r}{'...' if len(data) > 16 else ''}"
    if not data:
        return "0 bytes (empty)"
    if isinstance(exc, UnidentifiedImageError):
        return f"{len(data)} bytes that are not an image PIL can read ({first})"
    reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", str(exc)) or type(exc).__name__
    return f"{reason} ({len(data)} bytes, {first})"


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
        arr = _integer_to_uint8(arr, None, index, f"{arr.dtype} array")
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


def _scale16(arr: np.ndarray) -> np.ndarray:
    """``round(v * 255 / 65535)`` for integers ``v`` in [0, 65535], exactly: 65535 = 255 * 257, so it
    is ``round(v / 257)``, and ``v / 257`` is never a half (257 is odd), so no tie-breaking rule applies."""
    return ((arr.astype(np.int64) * 2 + 257) // 514).astype(np.uint8)


def _integer_to_uint8(arr: np.ndarray, bits: int | None, index: int | None, what: str) -> np.ndarray:
    """8-bit values of the integer pixels ``arr`` by the integer rule (module docstring); ``bits``:
    the bit depth a file declares (16: scaled by 255/65535 whatever the values), else ``None``."""
    if not arr.size:
        return arr.astype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255 and bits != 16:
        return arr.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return _scale16(arr)
    raise SampleError(index, "image", f"{what} values span [{lo}, {hi}]: integer pixels are read as 8-bit when all lie "
                                      "in [0, 255] and as 16-bit when all lie in [0, 65535]; convert it to 8-bit "
                                      "first, e.g. Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), or "
                                      "rescale it to [0, 255] yourself")


def _float_to_uint8(arr: np.ndarray, index: int | None) -> np.ndarray:
    """8-bit values of a mode-``F`` image: [0, 1] onto [0, 255], values in [0, 255] kept."""
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif not (lo >= 0.0 and hi <= 255.0):
        raise SampleError(index, "image", f"float image values span [{lo:.4g}, {hi:.4g}]; expected [0, 1] "
                                          "(or [0, 255]): normalise it first")
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def to_rgb8(img: Image.Image, index: int | None = None) -> Image.Image:
    """An 8-bit RGB copy of ``img`` (``img`` itself when it is RGB already), scaling high-bit-depth
    modes by their range instead of clipping them (PIL's ``convert("RGB")`` clips 16-bit and 32-bit
    values at 255 and maps float values in [0, 1] to black):

    * ``I`` (32-bit integer) and ``I;16*`` (16-bit): the integer rule of the module docstring --
      values in [0, 255] kept, values in [0, 65535] ``round(v * 255 / 65535)``, anything else a
      ``SampleError``; read from a file that declares 16-bit samples, always ``round(v * 255 / 65535)``;
    * ``F`` (32-bit float): ``[0, 1]`` onto ``[0, 255]``; values already in ``[0, 255]`` kept;
      anything else (or NaN) is a ``SampleError``;
    * every other mode through ``convert("RGB")`` (alpha dropped, as the reference does).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        if mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise SampleError(index, "image", f"{mode} image holds NaN or infinite pixel values")
            gray = _float_to_uint8(arr, index)
        else:
            gray = _integer_to_uint8(np.asarray(img).astype(np.int64), _bits_per_sample(img), index,
                                     f"mode {mode} image")
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
