"""Stage-1 example sets: validated up front, read lazily.

Two kinds of example set, both ``torch.utils.data.Dataset`` over a Hugging Face ``datasets.Dataset``
or a list of dicts:

* :class:`ScoredExamples` -- (image, text, optional question, score) for the MSE loss; scores are
  checked against a declared range ``[lo, hi]`` and mapped to ``[0, 1]``;
* :class:`PreferencePairs` -- (image, chosen, rejected, optional question) for the Bradley-Terry
  loss; ``chosen``/``rejected`` are two texts for one image (``pair_kind="text"``) or two images
  for one text (``pair_kind="image"``).

Every row is checked before training starts (cheaply: image columns are not decoded): an empty
set, a missing column, a missing image or image file, an empty text, or a score that is missing,
not finite or outside the range is a ``ValueError`` naming the set, the row and the column.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.rows import resolve_image
from ..errors import ConfigError, DataError

__all__ = ["PreferencePairs", "ScoredExamples", "collate_examples", "collate_pairs"]

_MAX_LISTED = 5


class _Table:
    """Column access over a ``datasets.Dataset`` or a list of dicts."""

    def __init__(self, data: Any, name: str):
        self.name = name
        self.hf = None
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and not hasattr(data, "column_names"):
            rows = list(data)
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise TypeError(f"{name} row {i}: expected a dict, got {type(row).__name__}")
            self.rows = rows
            self.columns = set().union(*(r.keys() for r in rows)) if rows else set()
        elif hasattr(data, "column_names") and hasattr(data, "features"):
            self.hf = data
            self.rows = None
            self.columns = set(data.column_names)
        else:
            raise TypeError(f"{name} data must be a datasets.Dataset or a list of dicts, got {type(data).__name__}")

    def __len__(self) -> int:
        return len(self.hf) if self.hf is not None else len(self.rows)

    def require(self, columns: list[str]) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(f"{self.name} data has no column(s) {missing}; columns are {sorted(self.columns)}")
        if self.rows is not None:
            for i, row in enumerate(self.rows):
                absent = [c for c in columns if c not in row]
                if absent:
                    raise DataError(f"{self.name} row {i}: missing field(s) {absent}")

    def column(self, name: str) -> list:
        return list(self.hf[name]) if self.hf is not None else [r[name] for r in self.rows]

    def is_image_feature(self, name: str) -> bool:
        return self.hf is not None and type(self.hf.features[name]).__name__ == "Image"

    def image_refs(self, name: str):
        """Yield (row, kind, value) without decoding: kind is "bytes", "path", "object" or "none"."""
        if self.is_image_feature(name):
            from datasets import Image

            raw = self.hf.select_columns([name]).cast_column(name, Image(decode=False)).with_format("arrow")
            row = 0
            for batch in raw.iter(batch_size=1024):
                col = batch.column(name)
                for item in col.to_pylist():
                    if item is None or (item.get("bytes") is None and not item.get("path")):
                        yield row, "none", None
                    elif item.get("bytes") is not None:
                        yield row, "bytes", None
                    else:
                        yield row, "path", item["path"]
                    row += 1
            return
        for row, value in enumerate(self.column(name)):
            if value is None:
                yield row, "none", None
            elif isinstance(value, (str, os.PathLike)):
                yield row, "path", os.fspath(value)
            elif isinstance(value, dict) and value.get("bytes") is None:
                yield (row, "path", value["path"]) if value.get("path") else (row, "none", None)
            else:
                yield row, "object", None

    def value(self, row: int, name: str):
        if self.hf is not None:
            return self.hf[row][name]
        return self.rows[row][name]


def _fail(table: _Table, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{table.name} data: " + "; ".join(problems[:_MAX_LISTED]) + more)


def _check_images(table: _Table, column: str, root: Path | None) -> None:
    problems = []
    for row, kind, path in table.image_refs(column):
        if kind == "none":
            problems.append(f"row {row}: image missing ({column!r} is empty)")
        elif kind == "path":
            full = resolve_image(path, root)
            if not os.path.isfile(full):
                problems.append(f"row {row}: image file not found: {full}")
    _fail(table, problems)


def _check_texts(table: _Table, column: str, *, optional: bool = False) -> list:
    values = table.column(column)
    problems = []
    for row, v in enumerate(values):
        if v is None and optional:
            continue
        if not isinstance(v, str):
            problems.append(f"row {row}: {column!r} must be a string, got {type(v).__name__}")
        elif not v.strip():
            problems.append(f"row {row}: {column!r} is empty")
    _fail(table, problems)
    return values


class _ExampleSet(torch.utils.data.Dataset):
    def __init__(self, data, name: str, image_root):
        self.table = _Table(data, name)
        if len(self.table) == 0:
            raise DataError(f"{name} data is empty")
        self.name = name
        self.root = Path(os.fspath(image_root)).expanduser() if image_root is not None else None

    def __len__(self) -> int:
        return len(self.table)

    def _image(self, row: int, column: str):
        return resolve_image(self.table.value(row, column), self.root)


class ScoredExamples(_ExampleSet):
    """(image, text, question, score) rows; ``score_range=(lo, hi)`` is the declared range of the
    raw scores, mapped linearly to ``[0, 1]``.

    ``self[i]`` -> ``{"image": image-like, "text": str, "question": str | None, "score": float,
    "row": i}``; ``scores``: (N,) float32 tensor of the mapped scores."""

    def __init__(self, data, *, name: str = "train", image_column: str = "image", text_column: str = "text",
                 score_column: str = "score", question_column: str | None = None,
                 score_range: tuple[float, float] = (0.0, 1.0), image_root: str | os.PathLike | None = None):
        super().__init__(data, name, image_root)
        lo, hi = float(score_range[0]), float(score_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"score_range must be two finite numbers lo < hi, got {score_range}")
        cols = [image_column, text_column, score_column] + ([question_column] if question_column else [])
        self.table.require(cols)
        self.image_column, self.question_column = image_column, question_column
        # 1. Scores: present, finite, inside the declared range.
        problems = []
        scores = []
        for row, s in enumerate(self.table.column(score_column)):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
                problems.append(f"row {row}: score {s!r} is not a finite number")
            elif not lo <= float(s) <= hi:
                problems.append(f"row {row}: score {s!r} is outside the declared range [{lo:g}, {hi:g}]")
            else:
                scores.append((float(s) - lo) / (hi - lo))
        _fail(self.table, problems)
        self.scores = torch.tensor(scores, dtype=torch.float32)
        # 2. Texts, questions, images.
        self.texts = _check_texts(self.table, text_column)
        self.questions = _check_texts(self.table, question_column, optional=True) if question_column else None
        _check_images(self.table, image_column, self.root)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self._image(i, self.image_column),
            "text": self.texts[i],
            "question": self.questions[i] if self.questions is not None else None,
            "score": float(self.scores[i]),
            "row": i,
        }


class PreferencePairs(_ExampleSet):
    """Bradley-Terry pairs. ``pair_kind="text"``: ``image`` + two texts ``chosen``/``rejected``;
    ``pair_kind="image"``: ``text`` + two images ``chosen``/``rejected``.

    ``self[i]`` -> ``{"images": [chosen, rejected], "texts": [chosen, rejected], "question": ...,
    "row": i}``."""

    def __init__(self, data, *, name: str = "train", pair_kind: str = "text", image_column: str = "image",
                 text_column: str = "text", chosen_column: str = "chosen", rejected_column: str = "rejected",
                 question_column: str | None = None, image_root: str | os.PathLike | None = None):
        super().__init__(data, name, image_root)
        if pair_kind not in ("text", "image"):
            raise ConfigError(f"pair_kind must be 'text' or 'image', got {pair_kind!r}")
        shared = image_column if pair_kind == "text" else text_column
        cols = [shared, chosen_column, rejected_column] + ([question_column] if question_column else [])
        self.table.require(cols)
        self.kind, self.shared = pair_kind, shared
        self.chosen_column, self.rejected_column, self.question_column = chosen_column, rejected_column, question_column
        self.questions = _check_texts(self.table, question_column, optional=True) if question_column else None
        if pair_kind == "text":
            self.chosen = _check_texts(self.table, chosen_column)
            self.rejected = _check_texts(self.table, rejected_column)
            same = [i for i, (c, r) in enumerate(zip(self.chosen, self.rejected)) if c == r]
            if same:
                raise DataError(f"{name} data: row {same[0]}: chosen and rejected texts are identical")
            _check_images(self.table, image_column, self.root)
        else:
            self.text = _check_texts(self.table, text_column)
            _check_images(self.table, chosen_column, self.root)
            _check_images(self.table, rejected_column, self.root)

    def __getitem__(self, i: int) -> dict:
        q = self.questions[i] if self.questions is not None else None
        if self.kind == "text":
            img = self._image(i, self.shared)
            return {"images": [img, img], "texts": [self.chosen[i], self.rejected[i]], "question": q, "row": i}
        text = self.text[i]
        return {"images": [self._image(i, self.chosen_column), self._image(i, self.rejected_column)],
                "texts": [text, text], "question": q, "row": i}


def collate_examples(batch: list[dict]) -> dict:
    """-> ``{"images": list, "texts": list[str], "questions": list | None, "scores": (B,) float32,
    "rows": (B,) long}``."""
    questions = [b["question"] for b in batch]
    return {
        "images": [b["image"] for b in batch],
        "texts": [b["text"] for b in batch],
        "questions": questions if any(q is not None for q in questions) else None,
        "scores": torch.tensor([b["score"] for b in batch], dtype=torch.float32),
        "rows": torch.tensor([b["row"] for b in batch], dtype=torch.long),
    }


def collate_pairs(batch: list[dict]) -> dict:
    """-> 2B samples, all chosen first then all rejected: ``images``, ``texts``, ``questions``,
    ``rows`` (B,)."""
    questions = [b["question"] for b in batch] * 2
    return {
        "images": [b["images"][0] for b in batch] + [b["images"][1] for b in batch],
        "texts": [b["texts"][0] for b in batch] + [b["texts"][1] for b in batch],
        "questions": questions if any(q is not None for q in questions) else None,
        "rows": torch.tensor([b["row"] for b in batch], dtype=torch.long),
    }
