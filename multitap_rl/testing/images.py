"""Deterministic test images."""

from __future__ import annotations

import random

__all__ = ["make_image"]


def make_image(seed: int = 0, size: tuple[int, int] = (64, 48)):
    """A deterministic RGB PIL image: a coloured background with a shape (different per seed)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = size
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    fg = tuple(rng.randint(0, 255) for _ in range(3))
    x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
    draw.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=fg)
    for _ in range(20):  # a little texture so patches differ
        x, y = rng.randint(0, w - 1), rng.randint(0, h - 1)
        img.putpixel((x, y), tuple(rng.randint(0, 255) for _ in range(3)))
    return img
