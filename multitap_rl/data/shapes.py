"""A learnable offline task: coloured shapes with captions that are right or wrong.

Each sample is a generated image of one coloured shape (circle, square, triangle, cross) at a
position (left, right, top, bottom, center) on a grey background, and a caption such as
``"a red circle on the left"``. A caption describes each attribute (colour, shape, position)
either correctly or wrongly, and its score says how right it is:

* ``scoring="binary"``: 1.0 if every attribute is right, else 0.0;
* ``scoring="graded"``: the fraction of the corruptible attributes described correctly
  (0, 1/3, 2/3, 1 with all three attributes).

It needs no hub data and is learnable: a reward model that reads the image and the caption can
drive its validation MSE far below the constant predictor's, which a model that ignores either
cannot. ``make_shapes_dataset`` returns a Hugging Face ``datasets.Dataset`` (columns ``image``,
``text``, ``score`` and the attributes); ``make_shapes_pairs`` returns Bradley-Terry preference
pairs (``image``, ``chosen``, ``rejected``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError, require

__all__ = [
    "POSITION_PHRASES",
    "SHAPE_ATTRIBUTES",
    "SHAPE_COLORS",
    "SHAPE_KINDS",
    "SHAPE_POSITIONS",
    "ShapeScene",
    "draw_shapes_image",
    "make_shapes_dataset",
    "make_shapes_pairs",
    "make_shapes_records",
    "shape_caption",
    "shape_pools",
    "write_shapes_jsonl",
]

SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPE_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SHAPE_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top",
                                    "bottom": "at the bottom", "center": "in the center"}
# Shape centre as a fraction of the image side.
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
            "center": (0.5, 0.5)}
_BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class ShapeScene:
    """One shape: ``color`` in SHAPE_COLORS, ``shape`` in SHAPE_KINDS, ``position`` in SHAPE_POSITIONS."""

    color: str
    shape: str
    position: str

    def __post_init__(self):
        for name, value, allowed in (("color", self.color, SHAPE_COLORS), ("shape", self.shape, SHAPE_KINDS),
                                     ("position", self.position, SHAPE_POSITIONS)):
            if value not in allowed:
                raise ConfigError(f"{name} {value!r} is not one of {sorted(allowed)}")


def shape_caption(scene: ShapeScene) -> str:
    """``ShapeScene("red", "circle", "left")`` -> ``"a red circle on the left"``."""
    return f"a {scene.color} {scene.shape} {POSITION_PHRASES[scene.position]}"


def draw_shapes_image(scene: ShapeScene, size: int = 112, rng: random.Random | None = None):
    """An RGB ``PIL.Image`` of ``size`` x ``size`` with the scene's shape; ``rng`` jitters the
    shape's size and place a little (the position stays unambiguous)."""
    from PIL import Image, ImageDraw

    if not isinstance(size, int) or size < 16:
        raise ConfigError(f"size must be an int >= 16, got {size!r}")
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    fx, fy = _CENTRES[scene.position]
    r = size * rng.uniform(0.14, 0.2)
    cx = size * fx + rng.uniform(-0.04, 0.04) * size
    cy = size * fy + rng.uniform(-0.04, 0.04) * size
    fill = SHAPE_COLORS[scene.color]
    box = [cx - r, cy - r, cx + r, cy + r]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def _choices(name: str, given: Sequence[str] | None, allowed, corrupted: bool) -> list[str]:
    values = list(allowed) if given is None else list(given)
    bad = [v for v in values if v not in allowed]
    least = 2 if corrupted else 1  # a caption can only be wrong in an attribute with alternatives
    if bad or len(values) < least or len(set(values)) != len(values):
        raise ConfigError(f"{name}: need at least {least} distinct of {sorted(allowed)}, got {values}")
    return values


def shape_pools(attributes, colors, shapes, positions) -> dict[str, list[str]]:
    """``{attribute: values}`` (``None``: every known value); an attribute in ``attributes`` needs
    at least 2 distinct known values, the others at least 1. Raises ``ConfigError`` naming the problem."""
    return {"color": _choices("colors", colors, SHAPE_COLORS, "color" in attributes),
            "shape": _choices("shapes", shapes, SHAPE_KINDS, "shape" in attributes),
            "position": _choices("positions", positions, SHAPE_POSITIONS, "position" in attributes)}


def _wrong(rng: random.Random, values: list[str], right: str) -> str:
    return rng.choice([v for v in values if v != right])


def make_shapes_records(
    n: int,
    *,
    seed: int = 0,
    scoring: str = "binary",
    p_correct: float = 0.5,
    attributes: Sequence[str] = SHAPE_ATTRIBUTES,
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    positions: Sequence[str] | None = None,
    image_size: int = 112,
    question: str | None = None,
) -> list[dict]:
    """``n`` samples as dicts: ``image`` (PIL), ``text``, ``score`` (float in [0, 1]), the scene
    (``color``, ``shape``, ``position``), ``n_wrong``, per attribute ``<attribute>_correct`` (1.0 if
    the caption names it right, else 0.0) and, if ``question`` is given, ``question``
    (the instruction task).

    A caption is right with probability ``p_correct``; otherwise 1..len(attributes) of the
    ``attributes`` (uniformly many, then uniformly which) are replaced by wrong values. The same
    arguments give the same samples.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    if scoring not in ("binary", "graded"):
        raise ConfigError(f"scoring must be 'binary' or 'graded', got {scoring!r}")
    if not 0.0 <= p_correct <= 1.0:
        raise ConfigError(f"p_correct must lie in [0, 1], got {p_correct}")
    attributes = list(attributes)
    if not attributes or any(a not in SHAPE_ATTRIBUTES for a in attributes) or len(set(attributes)) != len(attributes):
        raise ConfigError(f"attributes must be distinct names from {SHAPE_ATTRIBUTES}, got {attributes}")
    pools = shape_pools(attributes, colors, shapes, positions)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        truth = {a: rng.choice(pools[a]) for a in SHAPE_ATTRIBUTES}
        scene = ShapeScene(**truth)
        said = dict(truth)
        wrong: list[str] = []
        if rng.random() >= p_correct:
            wrong = rng.sample(attributes, rng.randint(1, len(attributes)))
            for a in wrong:
                said[a] = _wrong(rng, pools[a], truth[a])
        if scoring == "binary":
            score = 0.0 if wrong else 1.0
        else:
            score = (len(attributes) - len(wrong)) / len(attributes)
        row = {
            "image": draw_shapes_image(scene, image_size, rng),
            "text": shape_caption(ShapeScene(**said)),
            "score": float(score),
            **truth,
            "n_wrong": len(wrong),
            **{f"{a}_correct": float(a not in wrong) for a in SHAPE_ATTRIBUTES},
        }
        if question is not None:
            row["question"] = question
        out.append(row)
    return out


def _dataset(rows: list[dict]):
    datasets = require("datasets", "train", "the shapes task as a Dataset")
    Dataset, Features, Image, Value = datasets.Dataset, datasets.Features, datasets.Image, datasets.Value
    features = {}
    for key, value in rows[0].items():
        if key.startswith("image"):
            features[key] = Image()
        elif isinstance(value, float):
            features[key] = Value("float32")
        elif isinstance(value, int):
            features[key] = Value("int32")
        else:
            features[key] = Value("string")
    return Dataset.from_list(rows, features=Features(features))


def make_shapes_dataset(n: int, **kwargs):
    """The shapes task as a ``datasets.Dataset`` with an ``Image`` column; arguments as
    :func:`make_shapes_records`."""
    return _dataset(make_shapes_records(n, **kwargs))


def make_shapes_pairs(n: int, *, seed: int = 0, image_size: int = 112, attributes: Sequence[str] = SHAPE_ATTRIBUTES,
                      **kwargs):
    """``n`` Bradley-Terry preference pairs as a ``datasets.Dataset``: ``image``, ``chosen`` (the
    right caption), ``rejected`` (a caption wrong in at least one of ``attributes``). Other keyword
    arguments (``colors``, ``shapes``, ``positions``) as :func:`make_shapes_records`."""
    right = make_shapes_records(n, seed=seed, p_correct=1.0, image_size=image_size, attributes=attributes, **kwargs)
    pools = shape_pools(list(attributes), kwargs.get("colors"), kwargs.get("shapes"), kwargs.get("positions"))
    rng = random.Random(seed + 1)
    rows = []
    for r in right:
        truth = {a: r[a] for a in SHAPE_ATTRIBUTES}
        said = dict(truth)
        for a in rng.sample(list(attributes), rng.randint(1, len(attributes))):
            said[a] = _wrong(rng, pools[a], truth[a])
        rows.append({"image": r["image"], "chosen": r["text"], "rejected": shape_caption(ShapeScene(**said))})
    return _dataset(rows)


def write_shapes_jsonl(out_dir, n: int, *, seed: int = 0, image_size: int = 112, **kwargs):
    """:func:`make_shapes_records` on disk: ``out_dir/images/NNNNN.png`` and ``out_dir/rows.jsonl``
    (``image`` relative to the file, ``text``, ``score``, the scene, ``<attribute>_correct``).
    Returns the JSONL path. Stage 2 offline: ``--target-columns color_correct,shape_correct,...``."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(make_shapes_records(n, seed=seed, image_size=image_size, **kwargs)):
        name = f"images/{i:05d}.png"
        row.pop("image").save(out / name)
        lines.append(json.dumps({"image": name, **row}))
    path = out / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
