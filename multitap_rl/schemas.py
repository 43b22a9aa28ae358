"""Objective schemas: which dimensions a dataset rates, and how its rows become scored samples.

A schema is data (a dict or a YAML file), not code::

    name: align-anything-ti2t
    task: instruction                  # caption | instruction (question + response)
    source: PKU-Alignment/align-anything (text-image-to-text)
    samples:                           # one data row -> one scored sample per entry
      - {image: image, question: question, text: response_1, tag: "1"}
      - {image: image, question: question, text: response_2, tag: "2"}
    dimensions:
      - name: prompt_following
        column: prompt_following_rate_{tag}   # "{tag}" is the sample's tag; default: the name
        binarize_at: 2                        # target = 1.0 if rate >= 2 else 0.0 (the reference)
        range: [0, 1]

Dimensions may also read one element of a list column (``column: meta_result, index: 3``) or the
mean of several (``index: [0, 1, 2]``), e.g. VisionReward's checklist answers. ``overall`` (the
stage-1 head) is never a schema dimension: it is always available.

Built-in presets (:data:`PRESETS`): ``align-anything-ti2t``, ``align-anything-t2i`` (the
reference's ``multi_objective_train.py`` data, binarised as it does), ``visionreward`` (a
VisionReward-style preset) and ``caption`` (no dimensions: features only). User schemas are
YAML files, e.g. ``multitap_rl/presets/objectives/accessibility.yaml`` (EYE4ALL-style criteria).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .dimensions import OVERALL, check_dimension_name
from .errors import ConfigError, DataError
from .yamlio import load_yaml_file, load_yaml_text

__all__ = [
    "PRESETS",
    "Dimension",
    "ObjectiveSchema",
    "SampleView",
    "list_schemas",
    "load_schema",
    "preset_schema",
]

TASKS = ("caption", "instruction")


@dataclass(frozen=True)
class Dimension:
    """One rated dimension.

    Attributes:
        name: the dimension's name (what weights and heads use).
        column: the data column holding the rating; may contain ``{tag}`` (the sample's tag).
            Default: ``name``.
        index: read element ``index`` of a list column, or the mean of the elements listed.
        binarize_at: if set, the target is ``1.0`` when the rating is ``>= binarize_at``, else ``0.0``.
        range: the valid target range ``(lo, hi)`` after binarising; values outside are an error.
        higher_is_better: ``False`` for dimensions such as harm or fear (give them negative weights).
        description: free text.
    """

    name: str
    column: str | None = None
    index: int | tuple[int, ...] | None = None
    binarize_at: float | None = None
    range: tuple[float, float] | None = None
    higher_is_better: bool = True
    description: str = ""

    def __post_init__(self):
        check_dimension_name(self.name)
        if self.name == OVERALL:
            raise ConfigError("'overall' is the stage-1 score; do not declare it as a schema dimension")
        where = f"dimension {self.name!r}"
        _text(self.column, f"{where}: field 'column'", optional=True)
        if isinstance(self.index, list):
            object.__setattr__(self, "index", tuple(self.index))
        if self.index is not None and not (_is_int(self.index) or (isinstance(self.index, tuple) and self.index
                                                                   and all(_is_int(i) for i in self.index))):
            raise ConfigError(f"{where}: field 'index' must be an int or a non-empty list of ints, got "
                              f"{_shown(self.index)}")
        if self.binarize_at is not None:
            object.__setattr__(self, "binarize_at", _finite(self.binarize_at, f"{where}: field 'binarize_at'"))
        if self.range is not None:
            if isinstance(self.range, (str, bytes, Mapping)) or not isinstance(self.range, Sequence) \
                    or len(self.range) != 2:
                raise ConfigError(f"{where}: field 'range' must be [lo, hi] (two numbers), got {_shown(self.range)}")
            lo, hi = (_finite(v, f"{where}: field 'range'") for v in self.range)
            if not lo < hi:
                raise ConfigError(f"{where}: range must be [lo, hi] with lo < hi, got {list(self.range)}")
            object.__setattr__(self, "range", (lo, hi))
        if not isinstance(self.higher_is_better, bool):
            raise ConfigError(f"{where}: field 'higher_is_better' must be true or false, got "
                              f"{_shown(self.higher_is_better)}")
        if self.description is None:
            object.__setattr__(self, "description", "")
        _text(self.description, f"{where}: field 'description'", empty_ok=True)

    def source(self, tag: str) -> str:
        return (self.column or self.name).replace("{tag}", tag)

    def value(self, row: Mapping, tag: str, where: str) -> float:
        """The target for one sample (``nan`` if the column is missing or null)."""
        col = self.source(tag)
        v = row.get(col) if isinstance(row, Mapping) else None
        if v is None:
            return math.nan
        if self.index is not None:
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise DataError(f"{where}: column {col!r} must be a list for dimension {self.name!r} (index "
                                 f"{self.index}), got {type(v).__name__}")
            idx = self.index if isinstance(self.index, tuple) else (self.index,)
            try:
                items = [v[i] for i in idx]
            except IndexError:
                raise DataError(f"{where}: column {col!r} has {len(v)} elements; dimension {self.name!r} "
                                 f"reads index {self.index}") from None
            vals = [_number(x, where, col) for x in items]
            x = math.nan if any(math.isnan(a) for a in vals) else sum(vals) / len(vals)
        else:
            x = _number(v, where, col)
        if math.isnan(x):
            return x
        if self.binarize_at is not None:
            x = 1.0 if x >= self.binarize_at else 0.0
        if self.range is not None and not (self.range[0] <= x <= self.range[1]):
            raise DataError(f"{where}: {self.name} = {x:g} (column {col!r}) is outside its range "
                             f"[{self.range[0]:g}, {self.range[1]:g}]")
        return x

    def to_dict(self) -> dict:
        d = {"name": self.name}
        for k in ("column", "index", "binarize_at", "range", "description"):
            v = getattr(self, k)
            if v not in (None, ""):
                d[k] = list(v) if isinstance(v, tuple) else v
        if not self.higher_is_better:
            d["higher_is_better"] = False
        return d


def _shown(value) -> str:
    """``value``'s type and (shortened) repr, for error messages about a field's type."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value, what: str) -> float:
    """``value`` as a float if it is a finite real number (not a bool), else a ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{what} must be a finite number, got {_shown(value)}")
    return float(value)


def _text(value, what: str, *, optional: bool = False, empty_ok: bool = False) -> None:
    """A ``ConfigError`` unless ``value`` is a string (non-empty unless ``empty_ok``), or None
    when ``optional``."""
    if value is None and optional:
        return
    if not (isinstance(value, str) and (empty_ok or value.strip())):
        raise ConfigError(f"{what} must be {'a string' if empty_ok else 'a non-empty string'}, got {_shown(value)}")


def _number(v, where: str, col: str) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        x = float(v)
    elif hasattr(v, "item") and getattr(v, "size", 1) == 1:  # numpy scalar
        x = float(v.item())
    else:
        raise DataError(f"{where}: column {col!r} must be a number, got {type(v).__name__} {v!r:.40}")
    if math.isinf(x):
        raise DataError(f"{where}: column {col!r} is infinite")
    return x


@dataclass(frozen=True)
class SampleView:
    """How one data row yields one sample: the columns of its image, text and (instruction task)
    question, and a ``tag`` substituted for ``{tag}`` in dimension columns."""

    image: str = "image"
    text: str = "text"
    question: str | None = None
    tag: str = ""

    def __post_init__(self):
        for role in ("image", "text", "question"):
            _text(getattr(self, role), f"sample view: field {role!r} (a column name)", optional=role == "question")
        if not isinstance(self.tag, str):
            raise ConfigError(f"sample view: field 'tag' must be a string, got {_shown(self.tag)}")

    def to_dict(self) -> dict:
        d = {"image": self.image, "text": self.text}
        if self.question is not None:
            d["question"] = self.question
        if self.tag:
            d["tag"] = self.tag
        return d


@dataclass(frozen=True)
class ObjectiveSchema:
    """Dimensions of one kind of data, and how its rows map to samples (see the module docstring)."""

    name: str
    dimensions: tuple[Dimension, ...] = ()
    task: str = "caption"
    samples: tuple[SampleView, ...] = (SampleView(),)
    source: str = ""
    description: str = ""
    id_column: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        _text(self.name, "schema field 'name'")
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise ConfigError(f"schema {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        for key in ("source", "description"):
            _text(getattr(self, key), f"schema {self.name!r}: field {key!r}", empty_ok=True)
        _text(self.id_column, f"schema {self.name!r}: field 'id_column' (a column name)", optional=True)
        for key, kind in (("dimensions", Dimension), ("samples", SampleView)):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
            if not isinstance(getattr(self, key), tuple) or not all(isinstance(x, kind) for x in getattr(self, key)):
                raise ConfigError(f"schema {self.name!r}: {key} must be a tuple of {kind.__name__}")
        if not self.samples:
            raise ConfigError(f"schema {self.name!r}: samples must list at least one view")
        names = [d.name for d in self.dimensions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"schema {self.name!r}: dimension names repeat: {dup}")
        for view in self.samples:
            if (view.question is None) != (self.task == "caption"):
                raise ConfigError(f"schema {self.name!r}: task {self.task!r} "
                                 + ("takes no question column" if self.task == "caption" else "needs a question column")
                                 + f" (sample view {view.to_dict()})")
        tags = [v.tag for v in self.samples]
        if len(set(tags)) != len(tags):
            raise ConfigError(f"schema {self.name!r}: sample views need distinct tags, got {tags}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    @property
    def target_ranges(self) -> dict[str, tuple[float, float]]:
        return {d.name: d.range for d in self.dimensions if d.range is not None}

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping) -> ObjectiveSchema:
        """A schema from its dict form (what YAML holds), every field's type checked: a bad field is a
        ``ConfigError`` naming it (``dimensions[2]: field 'range' ...``), never a raw Python error."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a schema must be a mapping, got {type(data).__name__}")
        if "name" not in data:
            raise ConfigError("a schema needs a 'name'")
        name = data["name"]
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"schema field 'name' must be a non-empty string, got {_shown(name)}")
        where = f"schema {name!r}"
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{where}: field names must be strings, got {bad_keys}")
        dims = [_dimension(d, i, where) for i, d in enumerate(_list_field(data, "dimensions", where, []))]
        views = [_view(v, i, where) for i, v in enumerate(_list_field(data, "samples", where, [{}]))]
        if not views:
            raise ConfigError(f"{where}: field 'samples' must list at least one view")
        task = data.get("task")
        if task is None:
            task = "instruction" if views[0].question else "caption"
        known = {"name", "task", "samples", "dimensions", "source", "description", "id_column"}
        return cls(name=name, dimensions=tuple(dims), task=task, samples=tuple(views),
                   source=_or_empty(data.get("source")), description=_or_empty(data.get("description")),
                   id_column=data.get("id_column"), extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_yaml_text(cls, text: str, where: str) -> ObjectiveSchema:
        return cls._from_yaml_data(load_yaml_text(text, where), where)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ObjectiveSchema:
        return cls._from_yaml_data(load_yaml_file(path), str(path))

    @classmethod
    def _from_yaml_data(cls, data, where: str) -> ObjectiveSchema:
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        d = {"name": self.name, "task": self.task}
        if self.source:
            d["source"] = self.source
        if self.description:
            d["description"] = self.description
        if self.id_column:
            d["id_column"] = self.id_column
        d["samples"] = [v.to_dict() for v in self.samples]
        d["dimensions"] = [x.to_dict() for x in self.dimensions]
        return d

    @classmethod
    def simple(cls, dims: Sequence[str] = (), *, image: str = "image", text: str = "text",
               question: str | None = None, id_column: str | None = None) -> ObjectiveSchema:
        """One sample per row from the given columns; each dimension read from its own column."""
        return cls(name="custom", dimensions=tuple(Dimension(n) for n in dims),
                   task="instruction" if question else "caption",
                   samples=(SampleView(image=image, text=text, question=question),), id_column=id_column)

    # -- rows -> samples --------------------------------------------------------------------------------
    def expand(self, row: Mapping, row_index: int, where: str | None = None) -> list[dict]:
        """The samples of one data row: ``[{"image", "text", "question", "targets": [D floats], "sample": k}]``.

        Missing image/text columns are an error naming the row (``where``, default ``"row N"``); a
        missing or null rating is NaN."""
        if not isinstance(row, Mapping):
            raise DataError(f"{where or f'row {row_index}'}: expected a mapping of columns, got {type(row).__name__}")
        out = []
        for k, view in enumerate(self.samples):
            here = (where or f"row {row_index}") + (f" (sample {view.tag})" if view.tag else "")
            for role in ("image", "text", "question"):
                col = getattr(view, role)
                if col is not None and row.get(col) is None:
                    have = ", ".join(sorted(map(str, row))[:20])
                    raise DataError(f"{here}: missing {role} column {col!r} (columns: {have})")
            text = row[view.text]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{here}: column {view.text!r} must be a non-empty string")
            q = row[view.question] if view.question else None
            if q is not None and (not isinstance(q, str) or not q.strip()):
                raise DataError(f"{here}: column {view.question!r} must be a non-empty string")
            out.append({
                "image": row[view.image],
                "text": text,
                "question": q,
                "sample": k,
                "targets": [d.value(row, view.tag, here) for d in self.dimensions],
            })
        return out


def _or_empty(value):
    """A free-text field: null reads as ``""``; anything else is checked by the schema."""
    return "" if value is None else value


def _list_field(data: Mapping, key: str, where: str, default: list) -> list:
    """``data[key]`` if it is a list (absent or null: ``default``), else a ``ConfigError`` naming it."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, list):
        raise ConfigError(f"{where}: field {key!r} must be a list, got {_shown(value)}")
    return value


def _dimension(d, i: int, where: str) -> Dimension:
    """Entry ``i`` of a schema's ``dimensions``: a name, or a mapping of :class:`Dimension` fields."""
    if isinstance(d, str):
        d = {"name": d}
    if not isinstance(d, Mapping) or "name" not in d:
        raise ConfigError(f"{where}: dimensions[{i}] must be a name or a mapping with 'name', got {_shown(d)}")
    unknown = set(d) - {"name", "column", "index", "binarize_at", "range", "higher_is_better", "description"}
    if unknown:
        raise ConfigError(f"{where}: dimension {d['name']!r}: unknown key(s) {sorted(map(str, unknown))}")
    try:
        return Dimension(**d)
    except ConfigError as exc:
        raise ConfigError(f"{where}: dimensions[{i}]: {exc}") from None


def _view(v, i: int, where: str) -> SampleView:
    """Entry ``i`` of a schema's ``samples``: a mapping of :class:`SampleView` fields (a numeric
    ``tag`` is read as its text, e.g. ``1`` -> ``"1"``)."""
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: each sample view must be a mapping, got {_shown(v)} (samples[{i}])")
    unknown = set(v) - {"image", "text", "question", "tag"}
    if unknown:
        raise ConfigError(f"{where}: sample view: unknown key(s) {sorted(map(str, unknown))}")
    v = dict(v)
    if _is_int(v.get("tag")):
        v["tag"] = str(v["tag"])
    try:
        return SampleView(**v)
    except ConfigError as exc:
        raise ConfigError(f"{where}: samples[{i}]: {exc}") from None


# ---------------------------------------------------------------------------------------------
# presets (data)
# ---------------------------------------------------------------------------------------------
def _align_anything(task: str, third: str, kind: str) -> dict:
    if task == "ti2t":
        views = [{"image": "image", "question": "question", "text": f"response_{i}", "tag": str(i)} for i in (1, 2)]
    else:
        views = [{"image": f"image_{i}", "text": "prompt", "tag": str(i)} for i in (1, 2)]
    dims = ["prompt_following", "objective_rules", third, "information_richness", "safety"]
    return {
        "name": f"align-anything-{task}",
        "task": "instruction" if task == "ti2t" else "caption",
        "source": f"PKU-Alignment/align-anything ({kind})",
        "description": (
            "The reference's multi_objective_train.py data: each row has two candidates, each rated per "
            "dimension (<dim>_rate_1/_2); the reference binarises every rate at >= 2, which this preset "
            "repeats (copy it and drop binarize_at for the raw rates)."
        ),
        "samples": views,
        "dimensions": [{"name": n, "column": f"{n}_rate_{{tag}}", "binarize_at": 2, "range": [0, 1]} for n in dims],
    }


PRESETS: dict[str, dict] = {
    "align-anything-ti2t": _align_anything("ti2t", "clarity", "text-image-to-text"),
    "align-anything-t2i": _align_anything("t2i", "aesthetics", "text-to-image"),
    "visionreward": {
        "name": "visionreward",
        "task": "caption",
        "source": "VisionReward-style (THUDM/VisionRewardDB-Image)",
        "description": (
            "VisionReward's top-level image dimensions. Each reads a column of the same name holding a "
            "score (e.g. the fraction of that dimension's checklist questions answered yes); to build them "
            "from the raw checklist list column, set column: meta_result and index: [question indices] "
            "per dimension. The reference instead regresses every checklist answer separately."
        ),
        "samples": [{"image": "image", "text": "prompt"}],
        "dimensions": [
            {"name": "alignment", "description": "the image shows what the prompt asks for"},
            {"name": "composition", "description": "layout, framing, balance"},
            {"name": "quality", "description": "clarity, lighting, colour, detail"},
            {"name": "fidelity", "description": "faithful shapes and anatomy, no artefacts"},
            {"name": "safety", "description": "no harmful or disturbing content"},
        ],
    },
    "caption": {
        "name": "caption",
        "task": "caption",
        "description": "features only: one sample per row from image + text columns, no rated dimensions",
        "samples": [{"image": "image", "text": "text"}],
        "dimensions": [],
    },
}


def list_schemas() -> list[str]:
    """Built-in preset names plus the packaged and user YAML schemas (:mod:`multitap_rl.presets`)."""
    from .presets import list_presets

    return list(dict.fromkeys([*PRESETS, *list_presets("objectives")]))


def load_schema(spec: ObjectiveSchema | Mapping | str | os.PathLike) -> ObjectiveSchema:
    """A schema from an instance, a dict, a YAML path, a built-in preset name, or the name of a
    packaged or user YAML schema (``MULTITAP_OBJECTIVES_DIR``)."""
    if isinstance(spec, ObjectiveSchema):
        return spec
    if isinstance(spec, Mapping):
        return ObjectiveSchema.from_dict(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"schema must be a name, a path, a dict or an ObjectiveSchema, got {type(spec).__name__}")
    path = Path(os.fspath(spec)).expanduser()
    if path.is_file():
        return ObjectiveSchema.from_yaml(path)
    schema = preset_schema(os.fspath(spec))
    if schema is not None:
        return schema
    raise ConfigError(f"schema {os.fspath(spec)!r}: no such file or preset; available: {list_schemas()}")


def preset_schema(name: str) -> ObjectiveSchema | None:
    """The schema preset ``name`` (built in, or a packaged or user YAML schema), never a file of
    that name in the working directory; None if there is none; a ``ConfigError`` naming the file
    and field if its YAML is broken."""
    from .presets import preset_text

    if name in PRESETS:
        return ObjectiveSchema.from_dict(copy.deepcopy(PRESETS[name]))
    found = preset_text("objectives", name)
    return None if found is None else ObjectiveSchema.from_yaml_text(found[1], found[0])
