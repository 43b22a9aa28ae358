"""Data: the row reader and image-path resolver every part shares (:mod:`.rows`) and the built-in
offline shapes task (:mod:`.shapes`) that stage 1 and the demo train on."""

from __future__ import annotations

from .rows import RowSource, load_table, open_rows, read_json_rows, resolve_image
from .shapes import (
    SHAPE_ATTRIBUTES,
    SHAPE_COLORS,
    SHAPE_KINDS,
    SHAPE_POSITIONS,
    ShapeScene,
    draw_shapes_image,
    make_shapes_dataset,
    make_shapes_pairs,
    make_shapes_records,
    shape_caption,
    write_shapes_jsonl,
)

__all__ = [
    "SHAPE_ATTRIBUTES",
    "SHAPE_COLORS",
    "SHAPE_KINDS",
    "SHAPE_POSITIONS",
    "RowSource",
    "ShapeScene",
    "draw_shapes_image",
    "load_table",
    "make_shapes_dataset",
    "make_shapes_pairs",
    "make_shapes_records",
    "open_rows",
    "read_json_rows",
    "resolve_image",
    "shape_caption",
    "write_shapes_jsonl",
]
