"""The served reward's wire protocol: JSON only (never pickle), checked field by field.

``POST /v1/score``::

    {"images": [<image>, ...], "texts": [str, ...], "questions": [str | null, ...]}   # questions optional
    <image> = base64 of PNG/JPEG bytes (a "data:image/...;base64," prefix is accepted)
            | {"path": "relative/or/absolute.png"}   (only when the server has an allowed root,
                                                      and only inside it)
    -> {"results": [{"overall": x, <dim>: y, ...} | {"error": {"index", "field", "message"}}, ...]}

One bad sample is that sample's ``error``; it never fails the request. A malformed request as a
whole (not JSON, wrong types, lengths that differ, too many samples, a body over the limit) is a
4xx :class:`HTTPError` with the reason.

``POST /openrlhf`` -- OpenRLHF's remote-reward protocol (``--reward.remote_url``)::

    {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [<label>, ...]}
    <label> = a JSON object (or its JSON text) {"image": <image>, "question": str (optional)}
    -> {"rewards": [float], "scores": [float], "extra_logs": {<dim>: mean over the batch}}

OpenRLHF carries no pixels: the image travels in the label column, as base64 or as a path under
the server's allowed root. The response is ``query[len(prompt):]`` (the query starts with its
prompt); a sample that cannot be scored gets the server's ``on_invalid`` float.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HTTPError", "ServeLimits", "decode_image", "decode_openrlhf_request", "decode_score_request",
           "encode_image", "error_result"]

PROTOCOL_VERSION = 1


class HTTPError(Exception):
    """A request the server refuses as a whole: ``status`` (4xx) and a reason for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold. Image pixels are limited as local scoring limits them
    (``multitap_rl.images.max_image_pixels``, a per-sample error)."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_samples: int = 1024
    allowed_root: str | None = None  # image paths are read only inside this directory


def _json(body: bytes, limits: ServeLimits) -> dict:
    if len(body) > limits.max_body_bytes:
        raise HTTPError(413, f"request body of {len(body):,} bytes exceeds the limit of {limits.max_body_bytes:,}")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPError(400, f"the body is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, f"the body must be a JSON object, got {type(doc).__name__}")
    return doc


def _list(doc: dict, key: str, n: int | None, limits: ServeLimits, *, optional: bool = False) -> list | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, list):
        raise HTTPError(400, f"'{key}' must be a list, got {type(value).__name__}")
    if len(value) > limits.max_samples:
        raise HTTPError(413, f"'{key}' holds {len(value)} samples; the limit is {limits.max_samples} per request")
    if n is not None and len(value) != n:
        raise HTTPError(400, f"'{key}' holds {len(value)} entries for {n} samples")
    return value


def decode_image(value, limits: ServeLimits):
    """One image field -> encoded bytes (base64) or a path inside the allowed root. Raises
    ``ValueError`` (that sample's error) for anything else."""
    if isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64 of an encoded image (PNG/JPEG)") from None
    if isinstance(value, dict) and set(value) == {"path"} and isinstance(value["path"], str):
        if limits.allowed_root is None:
            raise ValueError("image paths are not accepted by this server (it has no allowed root); send the "
                             "image's bytes as base64")
        root = Path(limits.allowed_root).resolve()
        path = (root / value["path"]).resolve()
        if path != root and root not in path.parents:
            raise ValueError(f"image path {value['path']!r} lies outside the server's allowed root")
        return os.fspath(path)
    raise ValueError(f"an image must be base64 text or {{\"path\": str}}, got {type(value).__name__}")


def decode_score_request(body: bytes, limits: ServeLimits) -> tuple[list, list, list | None, dict[int, tuple]]:
    """``POST /v1/score`` -> (images, texts, questions or None, {index: (field, message)} of samples
    already invalid). Images that fail to decode here are left None and listed as invalid."""
    doc = _json(body, limits)
    unknown = sorted(set(doc) - {"images", "texts", "questions"})
    if unknown:
        raise HTTPError(400, f"unknown field(s) {unknown}; a score request holds images, texts and questions")
    texts = _list(doc, "texts", None, limits)
    images = _list(doc, "images", len(texts), limits)
    questions = _list(doc, "questions", len(texts), limits, optional=True)
    invalid: dict[int, tuple] = {}
    decoded = []
    for i, value in enumerate(images):
        try:
            decoded.append(decode_image(value, limits))
        except ValueError as exc:
            decoded.append(None)
            invalid[i] = ("image", str(exc))
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            invalid.setdefault(i, ("text", f"expected str, got {type(text).__name__}"))
    if questions is not None:
        for i, q in enumerate(questions):
            if q is not None and not isinstance(q, str):
                invalid.setdefault(i, ("question", f"expected str or null, got {type(q).__name__}"))
        if all(q is None for q in questions):
            questions = None
    return decoded, texts, questions, invalid


def decode_openrlhf_request(body: bytes, limits: ServeLimits) -> tuple[list, list, list | None, dict[int, tuple]]:
    """OpenRLHF's ``{"query", "prompts", "labels"}`` -> the same tuple as :func:`decode_score_request`."""
    doc = _json(body, limits)
    queries = _list(doc, "query", None, limits)
    prompts = _list(doc, "prompts", len(queries), limits)
    labels = _list(doc, "labels", len(queries), limits)
    images, texts, questions, invalid = [], [], [], {}
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        image = question = None
        text = ""
        try:
            if not isinstance(query, str) or not isinstance(prompt, str):
                raise ValueError("text", "query and prompt must be strings")
            text = query[len(prompt):] if query.startswith(prompt) else query
            if isinstance(label, str):
                try:
                    label = json.loads(label)
                except json.JSONDecodeError:
                    raise ValueError("image", "the label must be a JSON object {\"image\": ...}") from None
            if not isinstance(label, dict) or "image" not in label:
                raise ValueError("image", "the label must hold {\"image\": base64 | {\"path\": ...}}")
            question = label.get("question")
            if question is not None and not isinstance(question, str):
                raise ValueError("question", "the label's question must be a string")
            try:
                image = decode_image(label["image"], limits)
            except ValueError as exc:
                raise ValueError("image", str(exc)) from None
        except ValueError as exc:
            invalid[i] = exc.args if len(exc.args) == 2 else ("image", str(exc))
        images.append(image)
        texts.append(text)
        questions.append(question)
    return images, texts, questions if any(q is not None for q in questions) else None, invalid


def error_result(index: int, field: str, message: str) -> dict:
    return {"error": {"index": index, "field": field, "message": message}}


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: a value that is not finite travels as null."""
    return float(x) if math.isfinite(x) else None


def encode_image(image) -> str:
    """An image (PIL, path, encoded bytes, array) as base64 PNG text for a request (encoded bytes and
    files are sent as they are: no re-encoding)."""
    import io

    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if isinstance(image, dict) and image.get("bytes") is not None:
        return base64.b64encode(bytes(image["bytes"])).decode("ascii")
    if isinstance(image, (str, os.PathLike)) or (isinstance(image, dict) and isinstance(image.get("path"), str)):
        path = image["path"] if isinstance(image, dict) else image
        return base64.b64encode(Path(os.fspath(path)).read_bytes()).decode("ascii")
    from multitap_rl.images import load_image

    buf = io.BytesIO()
    load_image(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
