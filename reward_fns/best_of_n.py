"""Best-of-N reranking: per image, candidates ranked by the weighted MULTI-TAP reward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ._shared import get_scorer, spec_for
from .trl import _dimension_names

__all__ = ["RankedCandidate", "rerank"]


@dataclass
class RankedCandidate:
    """One candidate: its ``text``, its ``index`` in the input list, the combined ``reward`` and every
    dimension's raw value (``dims`` includes ``overall``)."""

    text: str
    index: int
    reward: float
    dims: dict[str, float] = field(default_factory=dict)


def rerank(images: Sequence, candidates: Sequence[Sequence[str]], weights=None, *, model,
           base_model=None, heads=None, questions: Sequence[str | None] | None = None,
           normalize: str = "none", gates: Sequence = (), device=None, dtype=None) -> list[list[RankedCandidate]]:
    """Rank each image's candidate texts, best first.

    Args:
        images: M images (any form ``MultiTapModel.score`` accepts).
        candidates: M lists of candidate texts (captions, or responses with ``questions``).
        weights: over ``overall`` and head dimensions (see ``multitap_rl.objectives.Weights``).
        model: a ``MultiTapModel`` or a checkpoint (directory or hub id; then ``base_model``/``heads``).
        questions: M questions for the instruction task, or None for captions.
        normalize: "none" or "fixed" (z-scores with the heads' statistics).
    Returns:
        M lists of :class:`RankedCandidate`, sorted by reward (ties keep input order). All M x N
        pairs are scored in one batched call (each image is encoded once).
    """
    from multitap_rl.objectives import RewardCombiner

    if normalize not in ("none", "fixed"):
        raise ValueError("rerank supports normalize='none' or 'fixed' (running statistics need a stream)")
    if isinstance(candidates, (str, bytes)) or len(images) != len(candidates):
        raise ValueError(f"got {len(images)} images but {len(candidates)} candidate lists; pass one list per image")
    if questions is not None and len(questions) != len(images):
        raise ValueError(f"got {len(questions)} questions for {len(images)} images")
    spec, loaded = spec_for(model, base_model=base_model, heads=heads, device=device, dtype=dtype)
    names, stats = _dimension_names(spec, loaded)
    combiner = RewardCombiner(weights, names, normalize=normalize, stats=stats, gates=gates)

    flat_images, flat_texts, flat_q, owner = [], [], [], []
    for i, (image, cands) in enumerate(zip(images, candidates)):
        if isinstance(cands, (str, bytes)):
            raise TypeError(f"image {i}: candidates must be a list of strings, got a single string")
        for j, text in enumerate(cands):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"image {i}, candidate {j}: empty or non-string text")
            flat_images.append(image)
            flat_texts.append(text)
            flat_q.append(None if questions is None else questions[i])
            owner.append((i, j))
    ranked: list[list[RankedCandidate]] = [[] for _ in images]
    if not flat_texts:
        return ranked
    try:
        dims = get_scorer(spec, loaded).score(flat_images, flat_texts, None if questions is None else flat_q)
    except ValueError as exc:  # "image 7: ..." -> which image/candidate
        msg = str(exc)
        head, _, rest = msg.partition(": ")
        kind, _, k = head.partition(" ")
        if k.isdigit() and int(k) < len(owner):
            i, j = owner[int(k)]
            raise ValueError(f"image {i}, candidate {j}: {kind}: {rest}") from None
        raise
    combined = combiner(dims)
    for k, (i, j) in enumerate(owner):
        ranked[i].append(RankedCandidate(
            text=flat_texts[k], index=j, reward=float(combined.reward[k]),
            dims={name: float(v[k]) for name, v in combined.dims.items()},
        ))
    for lst in ranked:
        lst.sort(key=lambda c: (-c.reward, c.index))
    return ranked
