"""The captioner world's vocabulary and its ground truth.

Images: one coloured shape on grey (:mod:`multitap_rl.data.shapes`). Captions:
``"a {colour} {shape} {position phrase}"``. Everything here that knows the truth (:func:`names`,
:func:`accuracy`) serves evaluation and the judge's *training labels* only; the RL loop sees the
judge's reward and nothing else.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..data.shapes import (
    POSITION_PHRASES,
    SHAPE_ATTRIBUTES,
    ShapeScene,
    draw_shapes_image,
    shape_caption,
    shape_pools,
)
from ..errors import ConfigError

ATTRIBUTES = SHAPE_ATTRIBUTES  # ("color", "shape", "position")


def make_pool(colors: Sequence[str], shapes: Sequence[str], positions: Sequence[str]) -> dict[str, list[str]]:
    """``{attribute: values}``; each attribute needs >= 2 distinct known values."""
    return shape_pools(ATTRIBUTES, colors, shapes, positions)


def random_scenes(rng: random.Random, n: int, pool) -> list[ShapeScene]:
    return [ShapeScene(**{a: rng.choice(pool[a]) for a in ATTRIBUTES}) for _ in range(n)]


def balanced_scenes(pool, repeats: int) -> list[ShapeScene]:
    """Every (colour, shape, position) ``repeats`` times: a captioner that ignores the image scores
    exactly chance (1 / number of values) on each attribute."""
    return [ShapeScene(c, s, p) for _ in range(repeats) for c in pool["color"] for s in pool["shape"]
            for p in pool["position"]]


def draw(scenes, size: int, rng: random.Random) -> list:
    return [draw_shapes_image(sc, size, rng) for sc in scenes]


def caption_of(color: str, shape: str, position: str) -> str:
    return shape_caption(ShapeScene(color, shape, position))


def names(text: str, attr: str, value: str, pool) -> bool:
    """Does ``text`` name ``value`` for ``attr``, and no other value of it? (string matching)"""
    t = " " + " ".join(text.lower().replace(".", " ").split()) + " "
    if attr == "position":
        hits = [v for v in pool["position"] if f" {POSITION_PHRASES[v]} " in t or f" {v} " in t]
    else:
        hits = [v for v in pool[attr] if f" {v} " in t]
    return hits == [value]


def well_formed(text: str, pool) -> bool:
    """``"a <colour> <shape> <position phrase>"`` with values from the pool, nothing else."""
    words = text.split()
    return (len(words) == 6 and words[0] == "a" and words[1] in pool["color"] and words[2] in pool["shape"]
            and " ".join(words[3:]) in {POSITION_PHRASES[p] for p in pool["position"]})


def accuracy(texts: Sequence[str], scenes: Sequence[ShapeScene], pool) -> dict[str, float]:
    """Per attribute: the fraction of ``texts`` naming their scene's true value (and no other);
    ``format``: the fraction that are well formed."""
    if len(texts) != len(scenes) or not scenes:
        raise ConfigError(f"accuracy needs one text per scene, got {len(texts)} texts for {len(scenes)} scenes")
    out = {a: sum(names(t, a, getattr(sc, a), pool) for t, sc in zip(texts, scenes)) / len(scenes)
           for a in ATTRIBUTES}
    out["format"] = sum(well_formed(t, pool) for t in texts) / len(texts)
    return {k: round(v, 4) for k, v in out.items()}


def judge_target(text: str, attr: str, value: str, pool) -> float:
    """The judge's label: 1 if the caption is well formed and names the true value, else 0."""
    return float(well_formed(text, pool) and names(text, attr, value, pool))


def malform(text: str, rng: random.Random, junk: Sequence[str]) -> str:
    """A caption off the format: words dropped, cut short, a piece repeated, or junk glued in."""
    words = text.split()  # a, colour, shape, preposition, the, place
    kind = rng.choice(["drop", "cut", "repeat", "junk"])
    if kind == "junk":
        i = rng.randrange(len(words))
        w = rng.choice(junk)
        piece = w[rng.randrange(len(w)):] or w
        words[i] = rng.choice([piece, words[i] + piece, piece + words[i]])
    elif kind == "drop":
        parts = [words[:1], words[1:2], words[2:3], words[3:]]
        words = [w for i, p in enumerate(parts) if i == 0 or rng.random() < 0.5 for w in p]
    elif kind == "cut":
        words = words[:rng.randint(1, len(words) - 1)]
    else:
        i = rng.randint(1, len(words) - 1)
        words = words + words[i:i + rng.randint(1, 3)]
    return " ".join(words)
