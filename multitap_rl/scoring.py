"""The batched feature engine: one call turns N (image, text[, question]) samples into (N, H).

How it stays fast without changing a single number the reference computes (DESIGN §4):

1. images are decoded once per object and encoded by the vision tower once per *content*
   (GRPO hands us each image G times, often as G separate decoded copies);
2. samples that share an image and a task prefix (the tokens up to the image's end) form a
   group; the prefix runs once per group and its key/value cache is reused by each member's
   suffix (the caption or response) -- exact, since positions and causal attention are those of
   the full sequence;
3. sequences are right-padded to the longest in a micro-batch (no fixed-length padding), sorted
   by length, with each micro-batch capped by a token budget; the last real token is gathered
   per row; no ``lm_head``.

``share_images=False, share_prefix=False`` runs every sample as one full sequence: the path the
tests compare against, and the one training uses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backbones.base import Backbone, PreparedImage, Segment, Tokenized
from .images import image_key, load_image

__all__ = ["EngineConfig", "FeatureEngine", "Request", "validate_batch"]

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_tokens: int = 8192  # cap on B * (cached + new tokens) per language-model call
    max_batch_patches: int = 16384  # cap on vision-tower patches per call
    share_images: bool = True
    share_prefix: bool = True


@dataclass
class Request:
    image: int  # index into the unique prepared images
    tok: Tokenized
    positions: torch.Tensor | None  # explicit positions for the whole sequence, or None


def validate_batch(images: Sequence, texts: Sequence, questions: Sequence | None) -> list[str | None]:
    """Check lengths and texts; return ``questions`` as a list (None for the caption task)."""
    for name, seq in (("images", images), ("texts", texts)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list (one entry per sample), got {type(seq).__name__}")
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images but {len(texts)} texts; pass one image per text")
    if questions is None:
        questions = [None] * len(texts)
    elif isinstance(questions, str) or len(questions) != len(texts):
        n = "a string" if isinstance(questions, str) else f"{len(questions)} questions"
        raise ValueError(f"got {n} for {len(texts)} texts; pass one question per text (or None)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i}: expected str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"text {i}: empty text")
    for i, q in enumerate(questions):
        if q is not None and (not isinstance(q, str) or not q.strip()):
            raise ValueError(f"question {i}: must be a non-empty string or None")
    return list(questions)


def _tokenize(backbone: Backbone, index: int, text: str, question: str | None, image: PreparedImage) -> Tokenized:
    """``backbone.tokenize``, with the sample named when it rejects the prompt."""
    try:
        return backbone.tokenize(text, question, image)
    except ValueError as exc:
        raise ValueError(f"sample {index}: {exc}") from None


class FeatureEngine:
    """Turns samples into last-position hidden states with a backbone; see the module docstring."""

    def __init__(self, backbone: Backbone, config: EngineConfig | None = None):
        self.backbone = backbone
        self.config = config or EngineConfig()

    # -- 1. CPU preparation ------------------------------------------------------------------
    def prepare(self, images: Sequence, texts: Sequence[str], questions: Sequence | None):
        questions = validate_batch(images, texts, questions)
        bb = self.backbone
        by_object: dict[int, int] = {}
        by_content: dict[bytes, int] = {}
        prepared: list[PreparedImage] = []
        image_of: list[int] = []
        for i, obj in enumerate(images):
            if self.config.share_images and id(obj) in by_object and not isinstance(obj, (int, float)):
                image_of.append(by_object[id(obj)])
                continue
            pil = load_image(obj, i)
            key = image_key(pil) if self.config.share_images else None
            if key is not None and key in by_content:
                idx = by_content[key]
            else:
                idx = len(prepared)
                prepared.append(bb.prepare_image(pil))
                if key is not None:
                    by_content[key] = idx
            if self.config.share_images:
                by_object[id(obj)] = idx
            image_of.append(idx)
        return prepared, self._requests(prepared, image_of, texts, questions)

    def _requests(self, prepared: list[PreparedImage], image_of: list[int], texts, questions) -> list[Request]:
        """Sample i uses ``prepared[image_of[i]]``: tokenize it (and its explicit positions)."""
        bb = self.backbone
        requests = []
        n_trunc = 0
        for i, (text, q) in enumerate(zip(texts, questions)):
            img = prepared[image_of[i]]
            tok = _tokenize(bb, i, text, q, img)
            n_trunc += tok.truncated
            requests.append(Request(image=image_of[i], tok=tok, positions=bb.positions(tok, img)))
        if n_trunc:
            logger.warning("%d sample(s) longer than max_length were truncated (as the reference does)", n_trunc)
        return requests

    # -- 2. model --------------------------------------------------------------------------------
    def features(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None) -> torch.Tensor:
        """(N, H) float32 last-position hidden states. Gradients flow if enabled by the caller."""
        prepared, requests = self.prepare(images, texts, questions)
        return self.run(prepared, requests)

    def features_from_prepared(self, prepared: Sequence[PreparedImage], texts: Sequence[str],
                               questions: Sequence | None = None) -> torch.Tensor:
        """(N, H) float32 from already prepared images, one per text (e.g. grad-carrying pixel
        values from ``backbone.prepare_pixels``); gradients flow if enabled by the caller."""
        questions = validate_batch(prepared, texts, questions)
        prepared = list(prepared)
        return self.run(prepared, self._requests(prepared, list(range(len(prepared))), texts, questions))

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
