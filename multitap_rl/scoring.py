"""The batched feature engine: one call turns N (image, text[, question]) samples into (N, H).

How it stays fast without changing a single number the reference computes (docs/ARCHITECTURE.md):

1. images are decoded once per object and encoded by the vision tower once per *content*
   (GRPO hands us each image G times, often as G separate decoded copies);
2. samples that share an image and a task prefix (the tokens up to the image's end) form a
   group; the prefix runs once per group and its key/value cache is reused by each member's
   suffix (the caption or response) -- exact, since positions and causal attention are those of
   the full sequence;
3. sequences are right-padded to the longest in a micro-batch (no fixed-length padding), sorted
   by length, with each micro-batch capped by a token budget; the last real token is gathered
   per row; no ``lm_head``.

Memory is bounded by a chunk, not by N: samples are prepared (decoded, preprocessed, tokenized)
and run in consecutive chunks of at most ``EngineConfig.max_images_per_chunk`` distinct images,
so preprocessed pixels of one chunk are freed before the next is prepared (same numbers; an image
that recurs in a later chunk is encoded again there).

``share_images=False, share_prefix=False`` runs every sample as one full sequence: the path the
tests compare against, and the one training uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backbones.base import Backbone, PreparedImage, Segment, Tokenized
from .errors import ConfigError, DataError, MultiTapError, SampleError
from .images import image_key, load_image

__all__ = ["EngineConfig", "FeatureEngine", "Request", "validate_batch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches (never what it computes): frozen, so it can sit in a hashable
    :class:`~multitap_rl.spec.ModelSpec`."""

    max_batch_tokens: int = 8192  # cap on B * (cached + new tokens) per language-model call
    max_batch_patches: int = 16384  # cap on vision-tower patches per call
    max_images_per_chunk: int = 64  # distinct images prepared at once: bounds a call's memory
    share_images: bool = True
    share_prefix: bool = True

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_batch_patches", "max_images_per_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"EngineConfig.{name} must be a positive int, got {v!r}")


@dataclass
class Request:
    image: int  # index into the unique prepared images
    tok: Tokenized
    positions: torch.Tensor | None  # explicit positions for the whole sequence, or None


def _is_list(seq) -> bool:
    """One entry per sample: a sequence, or any sized indexable (a ``datasets`` column, an array)."""
    if isinstance(seq, (str, bytes, dict)):
        return False
    return isinstance(seq, Sequence) or (hasattr(seq, "__getitem__") and hasattr(seq, "__len__"))


def validate_batch(images: Sequence, texts: Sequence, questions: Sequence | None,
                   errors: dict[int, SampleError] | None = None) -> list[str | None]:
    """Check lengths and texts; return ``questions`` as a list (None for the caption task).

    Every string a policy can emit is scored, as the reference scores it -- empty and
    whitespace-only texts and questions included. A text or question that is not a string, or not
    valid Unicode (a lone surrogate, which no tokenizer can encode), is a :class:`SampleError`
    naming the sample; with ``errors`` (a dict) it is recorded there under the sample's index
    instead of raised."""
    for name, seq in (("images", images), ("texts", texts)):
        if not _is_list(seq):
            raise TypeError(f"{name} must be a list (one entry per sample), got {type(seq).__name__}")
    if len(images) != len(texts):
        raise DataError(f"got {len(images)} images but {len(texts)} texts; pass one image per text")
    if questions is None:
        questions = [None] * len(texts)
    elif isinstance(questions, str) or not _is_list(questions) or len(questions) != len(texts):
        n = "a string" if isinstance(questions, str) else f"{len(questions)} questions" if _is_list(questions) \
            else type(questions).__name__
        raise DataError(f"got {n} for {len(texts)} texts; pass one question per text (or None)")
    for i, (text, q) in enumerate(zip(texts, questions)):
        problem = _string_problem(i, "text", text) or (None if q is None else _string_problem(i, "question", q))
        if problem is not None:
            if errors is None:
                raise problem
            errors.setdefault(i, problem)
    return list(questions)


def _string_problem(i: int, field: str, s) -> SampleError | None:
    """Why ``s`` cannot be tokenized (not a str, or not valid Unicode), else None."""
    if not isinstance(s, str):
        return SampleError(i, field, f"expected str{' or None' if field == 'question' else ''}, got {type(s).__name__}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        return SampleError(i, field, f"not valid Unicode: a lone surrogate {s[exc.start]!r} at character {exc.start}")
    return None


def _object_key(obj):
    """A key for "this very input object" within one call, or None. Paths key by their string;
    encoded bytes by a digest of their content; other objects (PIL images, arrays, tensors) by a
    weak reference checked on use, so a freed object whose ``id`` is reused never matches."""
    if isinstance(obj, (str, os.PathLike)):
        return ("path", os.fspath(obj))
    data = obj.get("bytes") if isinstance(obj, dict) else obj
    if isinstance(data, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.blake2b(bytes(data), digest_size=16).digest())
    if isinstance(obj, dict) and isinstance(obj.get("path"), str):
        return ("path", obj["path"])
    try:
        return ("obj", id(obj), weakref.ref(obj))
    except TypeError:  # not weak-referenceable: decode it every time
        return None


class _ObjectCache:
    """``input object -> content key`` for one call, without keeping any object alive."""

    def __init__(self):
        self._keys: dict = {}

    def get(self, obj):
        k = _object_key(obj)
        if k is None:
            return None
        if k[0] == "obj":
            hit = self._keys.get(k[1])
            return hit[1] if hit is not None and hit[0]() is obj else None
        return self._keys.get(k)

    def put(self, obj, content: bytes) -> None:
        k = _object_key(obj)
        if k is None:
            return
        if k[0] == "obj":
            self._keys[k[1]] = (k[2], content)
        else:
            self._keys[k] = content


class FeatureEngine:
    """Turns samples into last-position hidden states with a backbone; see the module docstring."""

    def __init__(self, backbone: Backbone, config: EngineConfig | None = None):
        self.backbone = backbone
        self.config = config or EngineConfig()

    # -- public ------------------------------------------------------------------------------------
    def features(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None, *,
                 errors: dict[int, SampleError] | None = None) -> torch.Tensor:
        """(N, H) float32 last-position hidden states on the model's device. Gradients flow if
        enabled by the caller.

        ``errors``: ``None`` raises the first :class:`SampleError`; a dict collects every bad sample
        by index instead, and those samples' rows are NaN (the caller must read ``errors``)."""
        questions = validate_batch(images, texts, questions, errors)
        n = len(texts)
        rows: list[torch.Tensor | None] = [None] * n
        for chunk in self._stream(images, texts, questions, errors):
            prepared, requests, owners = chunk
            for i, h in zip(owners, self.run(prepared, requests)):
                rows[i] = h
            del chunk, prepared, requests  # free this chunk's pixels before the next is prepared
        valid = [r for r in rows if r is not None]
        if not valid:
            return torch.full((n, self.backbone.hidden_size), float("nan")) if n else \
                torch.zeros(0, self.backbone.hidden_size)
        nan = torch.full_like(valid[0], float("nan"))
        return torch.stack([r if r is not None else nan for r in rows]).float()

    def features_from_prepared(self, prepared: Sequence[PreparedImage], texts: Sequence[str],
                               questions: Sequence | None = None) -> torch.Tensor:
        """(N, H) float32 from already prepared images, one per text (e.g. grad-carrying pixel
        values from ``backbone.prepare_pixels``); gradients flow if enabled by the caller."""
        questions = validate_batch(prepared, texts, questions)
        prepared = list(prepared)
        requests = [self._request(i, img_index, prepared[img_index], text, q)
                    for i, (img_index, text, q) in enumerate(zip(range(len(prepared)), texts, questions))]
        self._warn_truncated(requests)
        return self.run(prepared, requests)

    # -- 1. CPU preparation, chunk by chunk -----------------------------------------------------------
    def _stream(self, images, texts, questions, errors):
        """Yield (prepared images, requests, sample indices) per chunk of distinct images."""
        bb, cfg = self.backbone, self.config
        objects = _ObjectCache()
        prepared: list[PreparedImage] = []
        by_content: dict[bytes, int] = {}
        requests: list[Request] = []
        owners: list[int] = []
        truncated = 0
        for i in range(len(texts)):
            if errors is not None and i in errors:
                continue
            try:
                obj = images[i]
                key = objects.get(obj) if cfg.share_images else None
                pil = None
                if key is None or key not in by_content:
                    pil = load_image(obj, i)
                    bb.check_image(pil)
                    key = image_key(pil) if cfg.share_images else None
                    if key is not None:
                        objects.put(obj, key)
                if key is None or key not in by_content:
                    if len(prepared) >= cfg.max_images_per_chunk:  # flush: bound memory by the chunk
                        truncated += sum(r.tok.truncated for r in requests)
                        yield prepared, requests, owners
                        prepared, by_content, requests, owners = [], {}, [], []
                    try:
                        prepared.append(bb.prepare_image(pil))
                    except ValueError as exc:
                        raise SampleError(i, "image", str(exc)) from None
                    if key is not None:
                        by_content[key] = len(prepared) - 1
                    index = len(prepared) - 1
                else:
                    index = by_content[key]
                requests.append(self._request(i, index, prepared[index], texts[i], questions[i]))
                owners.append(i)
            except SampleError as exc:
                if errors is None:
                    raise
                errors.setdefault(i, exc)
            except MultiTapError:  # a setting, not this sample (e.g. a bad MULTITAP_MAX_IMAGE_PIXELS)
                raise
            except ValueError as exc:  # the backbone's own check of this image
                if errors is None:
                    raise SampleError(i, "image", str(exc)) from None
                errors.setdefault(i, SampleError(i, "image", str(exc)))
        truncated += sum(r.tok.truncated for r in requests)
        if truncated:
            logger.warning("%d sample(s) longer than max_length were truncated (as the reference does)", truncated)
        if requests:
            yield prepared, requests, owners

    def _request(self, i: int, index: int, img: PreparedImage, text: str, question: str | None) -> Request:
        """Sample ``i`` (using prepared image ``index``): its tokens and explicit positions."""
        bb = self.backbone
        try:
            tok = bb.tokenize(text, question, img)
        except ValueError as exc:  # the backbone's PromptError names the field at fault
            raise SampleError(i, getattr(exc, "field", "text"), str(exc)) from None
        return Request(image=index, tok=tok, positions=bb.positions(tok, img))

    @staticmethod
    def _warn_truncated(requests: list[Request]) -> None:
        n = sum(r.tok.truncated for r in requests)
        if n:
            logger.warning("%d sample(s) longer than max_length were truncated (as the reference does)", n)

    # -- 2. model --------------------------------------------------------------------------------
    def run(self, prepared: list[PreparedImage], requests: list[Request]) -> torch.Tensor:
        n = len(requests)
        if n == 0:
            return torch.zeros(0, self.backbone.hidden_size)
        groups = self._groups(requests)
        uses = defaultdict(int)
        for g in groups:
            uses[requests[g[0]].image] += 1
        feats: dict[int, torch.Tensor] = {}
        out: list[torch.Tensor | None] = [None] * n
        for chunk in self._chunks(groups, requests):
            self._encode_missing(chunk, requests, prepared, feats)
            for idx, h in self._run_chunk(chunk, requests, feats):
                out[idx] = h
            for g in chunk:  # free image features no later group needs
                img = requests[g[0]].image
                uses[img] -= 1
                if uses[img] == 0:
                    feats.pop(img, None)
        return torch.stack(out).float()

    def _groups(self, requests: list[Request]) -> list[list[int]]:
        if not self.config.share_prefix:
            return [[i] for i in range(len(requests))]
        by_key: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.image, tuple(r.tok.ids[: r.tok.prefix_len]))
            by_key.setdefault(key, []).append(i)
        return list(by_key.values())

    def _prefix_len(self, requests: list[Request], group: list[int]) -> int:
        """Tokens run once for the whole group; 0 (one full pass) for a group of one."""
        if not self.config.share_prefix or len(group) < 2:
            return 0
        return requests[group[0]].tok.prefix_len

    def _chunks(self, groups: list[list[int]], requests: list[Request]):
        """Groups sorted by prefix length (then total length), chunked so that each chunk's
        prefix pass fits the token budget. Prefix lengths within a chunk are equal."""
        budget = self.config.max_batch_tokens
        key = lambda g: (self._prefix_len(requests, g), max(len(requests[i].tok.ids) for i in g))  # noqa: E731
        chunk: list[list[int]] = []
        for g in sorted(groups, key=key):
            p = self._prefix_len(requests, g)
            if chunk and (p != self._prefix_len(requests, chunk[0]) or (len(chunk) + 1) * p > budget):
                yield chunk
                chunk = []
            chunk.append(g)
            if not p and len(chunk) * 64 >= budget:  # no prefix: keep chunks bounded anyway
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _encode_missing(self, chunk, requests, prepared, feats) -> None:
        todo = sorted({requests[g[0]].image for g in chunk} - feats.keys())
        batch: list[int] = []
        cost = 0
        for idx in todo + [None]:
            c = prepared[idx].cost if idx is not None else 0
            if batch and (idx is None or cost + c > self.config.max_batch_patches):
                for j, f in zip(batch, self.backbone.encode_images([prepared[j] for j in batch])):
                    feats[j] = f
                batch, cost = [], 0
            if idx is not None:
                batch.append(idx)
                cost += c

    def _positions(self, reqs: list[Request], start: int, width: int) -> torch.Tensor | None:
        if reqs[0].positions is None:
            return None
        rows = []
        for r in reqs:
            p = r.positions[..., start : start + width]
            if p.shape[-1] < width:  # right padding: continue the last position
                extra = p[..., -1:] + torch.arange(1, width - p.shape[-1] + 1)
                p = torch.cat([p, extra], dim=-1)
            rows.append(p)
        return torch.stack(rows, dim=-2)  # (..., B, S)

    def _segment(self, reqs: list[Request], start: int, feats) -> Segment:
        lens = [len(r.tok.ids) - start for r in reqs]
        width = max(lens)
        ids = torch.full((len(reqs), width), self.backbone.pad_id, dtype=torch.long)
        img_feats = []
        for row, r in enumerate(reqs):
            seg = r.tok.ids[start:]
            ids[row, : len(seg)] = torch.tensor(seg, dtype=torch.long)
            img_feats.append(feats.get(r.image))
        return Segment(
            ids=ids,
            lengths=torch.tensor(lens),
            start=start,
            image_features=img_feats,
            positions=self._positions(reqs, start, width),
        )

    def _run_chunk(self, chunk: list[list[int]], requests: list[Request], feats):
        bb = self.backbone
        p = self._prefix_len(requests, chunk[0])
        cache = None
        if p:
            # one prefix row per group; all rows have length p (no padding)
            heads = [requests[g[0]] for g in chunk]
            prefix_reqs = [Request(r.image, Tokenized(r.tok.ids[:p], p), r.positions) for r in heads]
            prefix = self._segment(prefix_reqs, 0, feats)
            prefix.final = False  # run for its cache; rows end before their samples do
            _, cache = bb.forward(prefix, use_cache=True)
        per_group = cache is not None and bb.cache_views
        length = lambda t: len(requests[t[1]].tok.ids)  # noqa: E731
        members = sorted(((gi, i) for gi, g in enumerate(chunk) for i in g),
                         key=(lambda t: (t[0], length(t))) if per_group else length)
        budget = self.config.max_batch_tokens
        start = 0
        while start < len(members):
            # grow the micro-batch while B * (p + longest suffix) fits the budget (and, for
            # cache_views backbones, while it stays in one prefix group)
            end = start + 1
            while end < len(members):
                if (end - start + 1) * length(members[end]) > budget:
                    break
                if per_group and members[end][0] != members[start][0]:
                    break
                end += 1
            batch = members[start:end]
            reqs = [requests[i] for _, i in batch]
            seg = self._segment(reqs, p, feats)
            sub = bb.select_cache(cache, torch.tensor([gi for gi, _ in batch])) if cache is not None else None
            last, _ = bb.forward(seg, cache=sub, use_cache=sub is not None)
            for (_, i), h in zip(batch, last):
                yield i, h
            start = end
