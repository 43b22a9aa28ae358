"""Generated text for the tiny tokenizers: a seeded corpus over a small vocabulary that holds the
shapes world's colour, shape and position words (so tiny models can name them)."""

from __future__ import annotations

import random

__all__ = ["COLORS", "POSITIONS", "SHAPES", "corpus"]

COLORS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
SHAPES = ["circle", "square", "triangle", "cross"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
_WORDS = (
    "a an the of in on at with and is are this that image picture photo shows there "
    "small large big tiny bright dark one two three some shape object background "
    "describe question answer what where which how many colour color side corner "
    "dog cat person man woman child tree house car road sky water grass street sign "
    "sitting standing running holding looking next near under over behind front"
).split()


def corpus(seed: int, n_lines: int = 3000) -> list[str]:
    """``n_lines`` lines of 3-14 random words (some capitalised and punctuated, some with a number)."""
    rng = random.Random(seed)
    vocab = _WORDS + COLORS + SHAPES + POSITIONS
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 14))]
        line = " ".join(words)
        if rng.random() < 0.5:
            line = line.capitalize() + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.1:
            line += f" {rng.randint(0, 999)}"
        lines.append(line)
    return lines
