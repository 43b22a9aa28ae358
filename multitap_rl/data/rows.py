"""One row reader and one image-path resolver for every part that reads data files.

Stage-1 training, stage-2 extraction and the command line all read rows through here, so a
relative image path means the same thing everywhere: it is joined to the directory of the data
file (or the ``image_root`` a caller gives), never looked up in the working directory as a
fallback (a file of the same name elsewhere would be scored silently). Without a data file (an
in-memory list or ``datasets.Dataset``) relative paths are read from the working directory.

* :func:`read_json_rows` -- a ``.jsonl`` (one object per line) or ``.json`` (a list) file, strictly
  UTF-8; errors name the file and line.
* :func:`load_table` -- any tabular source as a ``datasets.Dataset`` (``.json``/``.jsonl``/``.csv``/
  ``.parquet``, ``save_to_disk`` directories, hub ids).
* :func:`open_rows` -- random access to rows (:class:`RowSource`) of a path, a ``datasets.Dataset``
  or a list of dicts.
* :func:`resolve_image` -- a row's image value with relative paths joined to the data root.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, require
from ..images import image_key

__all__ = ["RowSource", "digest_files", "digest_rows", "load_table", "open_rows", "read_json_rows", "resolve_image"]


def resolve_image(value: Any, root: Path | None) -> Any:
    """A row's image value, ready for :func:`multitap_rl.images.load_image`.

    A path (``str``/``PathLike``, or an undecoded ``{"bytes": None, "path": ...}`` as ``datasets``
    stores it) that is relative is joined to ``root`` (the data file's directory) when there is
    one; ``~`` is expanded. Anything else (PIL images, bytes, arrays) is returned unchanged."""
    if isinstance(value, Mapping) and value.get("bytes") is None and isinstance(value.get("path"), str):
        value = value["path"]
    if not isinstance(value, (str, os.PathLike)):
        return value
    p = Path(os.fspath(value)).expanduser()
    if not p.is_absolute() and root is not None:
        p = root / p
    return str(p)


def read_json_rows(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """(rows, line numbers) of a ``.jsonl`` file (one JSON object per line; blank lines skipped) or a
    ``.json`` file holding a list of objects (line numbers are then 1-based list positions).

    The file must be UTF-8; a bad line, a non-object row or an undecodable byte is a
    :class:`DataError` naming the file and the line."""
    p = Path(os.fspath(path))
    data = p.read_bytes()
    if p.suffix.lower() == ".json" and data.lstrip().startswith(b"["):
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason}); re-save it as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        lines = list(range(1, len(rows) + 1))
    else:
        rows, lines = [], []
        for n, raw in enumerate(data.splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{p}: line {n}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                                "re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}: line {n}: not valid JSON ({exc.msg})") from None
            lines.append(n)
    for row, n in zip(rows, lines):
        if not isinstance(row, dict):
            raise DataError(f"{p}: line {n}: expected a JSON object, got {type(row).__name__}")
    return rows, lines


def digest_files(paths: list[Path]) -> str:
    """``"sha256:..."`` of the files' names and bytes, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}\n".encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:32]


def _digest_value(h, value) -> None:
    """Feed one cell into ``h`` by content (images by their pixels, arrays by their bytes)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        h.update(b"img:" + image_key(value))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        h.update(b"bytes:" + hashlib.blake2b(bytes(value), digest_size=16).digest())
    elif isinstance(value, np.ndarray) or type(value).__module__.startswith("torch"):
        arr = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        h.update(f"arr:{arr.dtype}{arr.shape}:".encode() + hashlib.blake2b(arr.tobytes(), digest_size=16).digest())
    elif isinstance(value, Mapping):
        for k in sorted(value, key=str):
            h.update(f"{k}=".encode())
            _digest_value(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _digest_value(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def digest_rows(rows) -> str:
    """``"sha256:..."`` of in-memory rows by content (images by their pixels, arrays by their bytes):
    equal rows in equal order give equal digests."""
    h = hashlib.sha256()
    for row in rows:
        _digest_value(h, row)
        h.update(b"\n")
    return "sha256:" + h.hexdigest()[:32]


class RowSource:
    """Random access to the rows of a dataset: ``len(src)``, ``src.rows(start, stop) -> [dict]``.

    Attributes:
        name: what the rows came from (a resolved path, or a description of an in-memory object).
        root: directory relative image paths are joined to (the data file's), or None.
        lines: for JSON/JSONL files, the 1-based line of each row (errors name it), else None.
    """

    def __init__(self, data, *, name: str, root: Path | None = None, limit: int | None = None,
                 lines: list[int] | None = None):
        self.data, self.name, self.root, self.lines = data, name, root, lines
        n = len(data)
        self.n = n if limit is None else min(n, int(limit))

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> list[dict]:
        stop = min(stop, self.n)
        if isinstance(self.data, list):
            return self.data[start:stop]
        cols = self.data[start:stop]  # datasets.Dataset: a column dict for a slice
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())] if cols else []

    def columns(self) -> list:
        """The column names these rows have: a ``datasets.Dataset``'s columns, or every key that
        any row (up to the limit) has, in first-seen order (a JSONL row may leave a column out)."""
        if isinstance(self.data, list):
            return list(dict.fromkeys(k for row in self.data[: self.n] for k in row))
        return list(self.data.column_names)

    def where(self, row: int) -> str:
        """How errors name data row ``row`` (0-based): ``"<file>: line 7"`` or ``"row 6"``."""
        if self.lines is not None and 0 <= row < len(self.lines):
            return f"{self.name}: line {self.lines[row]}"
        return f"row {row}"

    def resolve_image(self, value):
        """:func:`resolve_image` against this source's root."""
        return resolve_image(value, self.root)


def open_rows(data, *, split: str = "train", limit: int | None = None) -> RowSource:
    """A :class:`RowSource` over ``data``: a path (``.jsonl``/``.json`` read directly; ``.parquet``,
    ``.csv`` and ``save_to_disk`` directories through ``datasets``), a ``datasets.Dataset``
    (or ``DatasetDict`` + ``split``) or a list of dicts."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    if isinstance(data, (str, os.PathLike)):
        path = Path(os.fspath(data)).expanduser()
        if not path.exists():
            raise DataError(f"data {os.fspath(data)!r}: no such file or directory")
        if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
            rows, lines = read_json_rows(path)
            if not rows:
                raise DataError(f"{path}: no rows")
            return RowSource(rows, name=str(path.resolve()), root=path.resolve().parent, limit=limit, lines=lines)
        ds, root = load_table(str(path), split=split)
        return RowSource(ds, name=str(path.resolve()), root=root, limit=limit)
    if hasattr(data, "keys") and hasattr(data, "column_names") and not hasattr(data, "features"):  # DatasetDict
        if split not in data:
            raise DataError(f"dataset has no split {split!r}; splits are {sorted(data.keys())}")
        data = data[split]
    if hasattr(data, "column_names") and hasattr(data, "features"):
        return RowSource(data, name=f"<datasets.Dataset {len(data)} rows>", limit=limit)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise TypeError(f"data row {i}: expected a dict, got {type(r).__name__}")
        if not rows:
            raise DataError("data has no rows")
        return RowSource(rows, name=f"<list of {len(rows)} rows>", limit=limit)
    raise TypeError(f"data must be a path, a datasets.Dataset or a list of dicts, got {type(data).__name__}")


def load_table(dataset: str, *, split: str, config_name: str | None = None, revision: str | None = None):
    """A ``datasets.Dataset``: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a directory
    written by ``save_to_disk``, a local dataset directory, or a hub id. Returns (dataset, image
    root): relative image paths in a local file are read next to it."""
    datasets = require("datasets", "train", "reading this data")
    path = Path(dataset).expanduser()
    if path.is_file():
        kinds = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        kind = kinds.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"dataset file {path}: unsupported type (use .json, .jsonl, .csv or .parquet)")
        return datasets.load_dataset(kind, data_files=str(path), split="train"), path.resolve().parent
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"dataset {path}: no split {split!r}; splits are {sorted(ds)}")
            ds = ds[split]
        return ds, path.resolve()
    if not path.exists() and os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true", "TRUE") \
            and dataset.count("/") == 1 and not dataset.startswith((".", "/", "~")):
        raise DataError(f"dataset {dataset!r}: not a local file or directory, and hub datasets are not available "
                        "offline (HF_DATASETS_OFFLINE=1): pass a local file or directory")
    try:
        ds = datasets.load_dataset(dataset, config_name, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 -- any failure to fetch/read is the user's data problem
        raise DataError(f"dataset {dataset!r} split {split!r}: cannot load ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return ds, (path.resolve() if path.is_dir() else None)
