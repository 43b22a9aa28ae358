"""Best-of-N reranking: per image, candidates ranked by the weighted MULTI-TAP reward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from multitap_rl.errors import ConfigError, DataError

from .core import RewardCore

__all__ = ["RankedCandidate", "rerank"]


@dataclass
class RankedCandidate:
    """One candidate: its ``text``, its ``index`` in the input list, the combined ``reward`` (None
    for a candidate that could not be scored, ranked last) and every dimension's raw value (``dims``
    includes ``overall``; ``error`` says why a candidate was not scored)."""

    text: str
    index: int
    reward: float | None
    dims: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def rerank(model_or_spec, images: Sequence, candidates: Sequence[Sequence[str]], *, weights=None,
           questions: Sequence[str | None] | None = None, base_model=None, heads=None, normalize: str = "none",
           gates: Sequence = (), on_invalid="raise") -> list[list[RankedCandidate]]:
    """Rank each image's candidate texts, best first.

    Args:
        model_or_spec: a ``MultiTapModel``, a :class:`~multitap_rl.ModelSpec`, or a checkpoint
            (directory or hub id; then ``base_model``/``heads``).
        images: M images (any form ``MultiTapModel.score`` accepts).
        candidates: M lists of candidate texts (captions, or responses with ``questions``).
        weights: over ``overall`` and head dimensions (see :class:`multitap_rl.combiner.Weights`).
        questions: M questions for the instruction task, or None for captions.
        normalize: "none" or "fixed" (z-scores with the heads' statistics).
        on_invalid: ``"raise"`` (default: a bad image or candidate raises, naming image and
            candidate) or ``"skip"`` (it is ranked last with ``reward=None`` and its ``error``).
    Returns:
        M lists of :class:`RankedCandidate`, sorted by reward (ties keep input order). All M x N
        pairs are scored in one batched call (each image is encoded once).
    """
    # 1. Arguments (weights included) before the model loads.
    if normalize not in ("none", "fixed"):
        raise ConfigError("rerank supports normalize='none' or 'fixed' (running statistics need a stream)")
    for name, seq in (("images", images), ("candidates", candidates)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list (one entry per image), got {type(seq).__name__}")
    if len(images) != len(candidates):
        raise DataError(f"got {len(images)} images but {len(candidates)} candidate lists; pass one list per image")
    if questions is not None and len(questions) != len(images):
        raise DataError(f"got {len(questions)} questions for {len(images)} images")
    core = RewardCore(model_or_spec, base_model=base_model, heads=heads, weights=weights, normalize=normalize,
                      gates=gates, on_invalid=on_invalid, invalid_options=("raise", "skip"))

    # 2. Flatten to M x N pairs (each image object repeated: the engine encodes it once).
    flat_images, flat_texts, flat_q, owner = [], [], [], []
    for i, (image, cands) in enumerate(zip(images, candidates)):
        if isinstance(cands, (str, bytes)) or not isinstance(cands, Sequence):
            raise TypeError(f"image {i}: candidates must be a list of strings, got {type(cands).__name__}")
        for j, text in enumerate(cands):
            flat_images.append(image)
            flat_texts.append(text)
            flat_q.append(None if questions is None else questions[i])
            owner.append((i, j))
    ranked: list[list[RankedCandidate]] = [[] for _ in images]
    if not flat_texts:
        return ranked

    # 3. One core call; errors named by image and candidate.
    out = core.evaluate(flat_images, flat_texts, None if questions is None else flat_q,
                        name=lambda k: (owner[k][0], "image", f", candidate {owner[k][1]}"))
    reward = out.reward.tolist()
    for k, (i, j) in enumerate(owner):
        text = flat_texts[k] if isinstance(flat_texts[k], str) else repr(flat_texts[k])
        if k in out.errors:
            ranked[i].append(RankedCandidate(text=text, index=j, reward=None, error=out.errors[k].message))
            continue
        ranked[i].append(RankedCandidate(text=text, index=j, reward=reward[k],
                                         dims={name: float(v[k]) for name, v in out.scores.items()}))
    for lst in ranked:
        lst.sort(key=lambda c: (c.reward is None, -(c.reward or 0.0), c.index))
    return ranked
