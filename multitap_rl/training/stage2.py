"""Stage 2: frozen features to disk, then ridge heads on them.

1. :func:`extract_features` runs the model over a dataset (a JSONL/JSON file, a ``datasets``
   directory from ``save_to_disk``, parquet/CSV, a ``datasets.Dataset`` or a list of dicts) and
   writes a **feature store**: ``manifest.json`` plus ``chunks/chunk-NNNNNN.safetensors``, chunk
   ``k`` holding data rows ``[k*C, (k+1)*C)``. Each chunk is written to a temporary file and
   renamed, so a chunk on disk is complete; an interrupted run resumes by computing exactly the
   chunks that are missing (no row lost, none computed twice). The manifest pins the data, schema,
   chunk size and model fingerprint, and a resume with different ones is refused.
2. :func:`load_features` reads a store back (:class:`FeatureSet`).
3. :func:`fit_heads` fits :class:`~multitap_rl.heads.RidgeHeads` on a store's features with its
   stored targets (from the schema) or a targets file, optionally holding out rows for a report.
4. :func:`evaluate_heads` scores heads (and ``overall``) against targets: a per-dimension report.

Chunk tensors: ``features`` (S, H) float32, ``overall`` (S,) float32, ``row`` (S,) int64 (data
row), ``sample`` (S,) int64 (view within the row), ``targets`` (S, D) float64 (NaN = not rated).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..heads import RidgeHeads
from ..schemas import ObjectiveSchema, load_schema

__all__ = [
    "FEATURES_FORMAT",
    "FeatureSet",
    "RowSource",
    "evaluate_heads",
    "extract_features",
    "fit_heads",
    "load_features",
    "model_identity",
    "open_rows",
    "read_targets",
    "split_rows",
]

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "multitap-rl/features"
FEATURES_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"


# ---------------------------------------------------------------------------------------------
# data rows
# ---------------------------------------------------------------------------------------------
class RowSource:
    """Random access to the rows of a dataset: ``len(src)``, ``src.rows(start, stop) -> [dict]``.

    ``root``: directory against which relative image paths are resolved (the data file's)."""

    def __init__(self, data, *, name: str, root: Path | None = None, limit: int | None = None):
        self.data, self.name, self.root = data, name, root
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

    def resolve_image(self, value):
        """A relative image path (or an undecoded ``{"bytes": None, "path": ...}``) is looked up
        next to the data file first, then in the working directory."""
        if isinstance(value, dict) and value.get("bytes") is None and isinstance(value.get("path"), str):
            value = value["path"]
        if self.root is None or not isinstance(value, (str, os.PathLike)):
            return value
        p = Path(os.fspath(value)).expanduser()
        if not p.is_absolute() and (self.root / p).exists():
            return str(self.root / p)
        return str(p)


def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n}: not valid JSON ({exc.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def open_rows(data, *, split: str = "train", limit: int | None = None) -> RowSource:
    """A :class:`RowSource` over ``data``: a path (``.jsonl``/``.json`` read directly; ``.parquet``,
    ``.csv`` and ``save_to_disk`` directories through ``datasets``), a ``datasets.Dataset``
    (or ``DatasetDict`` + ``split``) or a list of dicts."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if isinstance(data, (str, os.PathLike)):
        path = Path(os.fspath(data)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data {os.fspath(data)!r}: no such file or directory")
        if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
            rows = _read_json_rows(path)
            if not rows:
                raise ValueError(f"{path}: no rows")
            return RowSource(rows, name=str(path.resolve()), root=path.parent, limit=limit)
        from .data import load_table

        try:
            ds, root = load_table(str(path), split=split)
        except ImportError as exc:
            raise ImportError(f"reading {path.suffix or 'dataset directories'} needs `datasets`: "
                              "pip install multitap-rl[train]") from exc
        return RowSource(ds, name=str(path.resolve()), root=root, limit=limit)
    if hasattr(data, "keys") and hasattr(data, "column_names") and not hasattr(data, "features"):  # DatasetDict
        if split not in data:
            raise ValueError(f"dataset has no split {split!r}; splits are {sorted(data.keys())}")
        data = data[split]
    if hasattr(data, "column_names") and hasattr(data, "features"):
        return RowSource(data, name=f"<datasets.Dataset {len(data)} rows>", limit=limit)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise TypeError(f"data row {i}: expected a dict, got {type(r).__name__}")
        if not rows:
            raise ValueError("data has no rows")
        return RowSource(rows, name=f"<list of {len(rows)} rows>", limit=limit)
    raise TypeError(f"data must be a path, a datasets.Dataset or a list of dicts, got {type(data).__name__}")


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------
def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def model_identity(model) -> dict:
    """What identifies the features a model extracts (saved with feature stores and heads)."""
    info = getattr(model, "info", {}) or {}
    bb = getattr(model, "backbone", None)
    return {
        "hidden_size": int(model.hidden_size),
        "checkpoint": info.get("fingerprint"),
        "checkpoint_name": info.get("checkpoint"),
        "base_model": info.get("base_model"),
        "family": info.get("family"),
        "rope": getattr(bb, "rope", None),
        "image_size": getattr(bb, "image_size", None),
        "max_length": getattr(bb, "max_length", None),
        "backbone_options": (bb.options() or None) if hasattr(bb, "options") else None,
    }


def _chunk_path(out: Path, k: int) -> Path:
    return out / CHUNK_DIR / f"chunk-{k:06d}.safetensors"


def _chunk_ok(path: Path, start: int, stop: int) -> bool:
    """A chunk file that is readable and covers exactly rows [start, stop)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return int(meta.get("start", -1)) == start and int(meta.get("stop", -1)) == stop
    except Exception:  # noqa: BLE001 -- any unreadable file is recomputed
        return False


_SAMPLE_ERR = re.compile(r"^(image|text|question) (\d+): (.*)$", re.S)


def extract_features(
    model,
    data,
    out: str | os.PathLike,
    *,
    schema: ObjectiveSchema | Mapping | str | os.PathLike | None = None,
    split: str = "train",
    chunk_size: int = 256,
    batch_size: int = 16,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Write the features of every sample of ``data`` to the store ``out`` (resuming if present).

    Args:
        model: a :class:`~multitap_rl.model.MultiTapModel` (``features``, ``overall_from_features``).
        data: see :func:`open_rows`.
        schema: how rows become samples and which targets to store (:func:`~multitap_rl.schemas.load_schema`);
            default: ``image``/``text`` (+ ``question`` if the first row has one) columns, no targets.
        chunk_size: data rows per chunk file (the unit of resumption).
        batch_size: samples per model call.
        limit: only the first ``limit`` rows.
        overwrite: discard an existing store at ``out`` instead of resuming it.
        on_chunk: called with each chunk index after it is written (progress hooks, tests).

    Returns the store directory.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    # 1. Inputs, schema, manifest.
    if chunk_size < 1 or batch_size < 1:
        raise ValueError("chunk_size and batch_size must be >= 1")
    src = open_rows(data, split=split, limit=limit)
    if schema is None:
        first = src.rows(0, 1)[0]
        schema = ObjectiveSchema.simple(question="question" if first.get("question") is not None else None)
    schema = load_schema(schema)
    out = Path(os.fspath(out))
    manifest = {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "n_rows": len(src),
        "chunk_size": int(chunk_size),
        "data": src.name,
        "schema": schema.to_dict(),
        "dims": list(schema.names),
        "model": model_identity(model),
    }
    _prepare_store(out, manifest, overwrite)

    # 2. Chunks not yet on disk.
    n_chunks = math.ceil(len(src) / chunk_size)
    todo = []
    done_rows = 0
    for k in range(n_chunks):
        start, stop = k * chunk_size, min((k + 1) * chunk_size, len(src))
        if _chunk_ok(_chunk_path(out, k), start, stop):
            done_rows += stop - start
        else:
            todo.append(k)
    if done_rows:
        logger.info("resuming %s: %d of %d rows already extracted", out, done_rows, len(src))

    # 3. Compute and write each missing chunk atomically.
    bar = tqdm(total=len(src), initial=done_rows, desc="extracting", unit="row", disable=not progress)
    try:
        for k in todo:
            start, stop = k * chunk_size, min((k + 1) * chunk_size, len(src))
            tensors, ids = _extract_chunk(model, schema, src, start, stop, batch_size)
            meta = {"start": str(start), "stop": str(stop), "format": FEATURES_FORMAT}
            if ids is not None:
                meta["ids"] = json.dumps(ids)
            path = _chunk_path(out, k)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            bar.update(stop - start)
            if on_chunk is not None:
                on_chunk(k)
    finally:
        bar.close()
    return out


def _prepare_store(out: Path, manifest: dict, overwrite: bool) -> None:
    mpath = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; pass a directory")
    if overwrite and mpath.is_file():
        for f in [*(out / CHUNK_DIR).glob("*.safetensors"), *(out / CHUNK_DIR).glob(".*.tmp")]:
            f.unlink()
        mpath.unlink()
        if (out / CHUNK_DIR).is_dir() and not any((out / CHUNK_DIR).iterdir()):
            (out / CHUNK_DIR).rmdir()
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{mpath}: corrupt manifest; pass overwrite=True (--overwrite) to start again") from None
        keys = ("format", "n_rows", "chunk_size", "data", "schema", "model")
        diffs = [k for k in keys if _identity(old, k) != _identity(manifest, k)]
        if diffs:
            detail = "; ".join(f"{k}: stored {_short(old.get(k))} vs now {_short(manifest.get(k))}" for k in diffs)
            raise ValueError(f"{out} holds features of a different run ({detail}); use another directory or "
                             "overwrite=True (--overwrite)")
    elif out.is_dir() and any(p.name != CHUNK_DIR or any(p.iterdir()) for p in out.iterdir()):
        raise ValueError(f"output directory {out} is not empty and holds no feature store; use an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    if not mpath.is_file():
        _atomic_json(mpath, manifest)
    (out / CHUNK_DIR).mkdir(exist_ok=True)
    for stale in (out / CHUNK_DIR).glob(".*.tmp"):  # left by an interrupted write
        stale.unlink()


_MODEL_IDENTITY = ("hidden_size", "checkpoint", "family", "rope", "image_size", "max_length", "backbone_options")


def _identity(manifest: dict, key: str):
    """What must match to resume: for the model, what changes the features (not where it lives)."""
    v = manifest.get(key)
    if key == "model" and isinstance(v, dict):
        return {k: v.get(k) for k in _MODEL_IDENTITY}
    return v


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def _extract_chunk(model, schema: ObjectiveSchema, src: RowSource, start: int, stop: int, batch_size: int):
    rows = src.rows(start, stop)
    samples, row_of = [], []
    for i, row in enumerate(rows):
        for s in schema.expand(row, start + i):
            s["image"] = src.resolve_image(s["image"])
            samples.append(s)
            row_of.append(start + i)
    ids = None
    if schema.id_column:
        ids = []
        for s, r in zip(samples, row_of):
            rid = rows[r - start].get(schema.id_column)
            if rid is None:
                raise ValueError(f"row {r}: missing id column {schema.id_column!r}")
            tag = schema.samples[s["sample"]].tag
            ids.append(f"{rid}:{tag}" if len(schema.samples) > 1 else str(rid))
    feats, overall = [], []
    with torch.inference_mode():
        for b in range(0, len(samples), batch_size):
            batch = samples[b : b + batch_size]
            qs = [s["question"] for s in batch]
            try:
                h = model.features([s["image"] for s in batch], [s["text"] for s in batch],
                                   qs if any(q is not None for q in qs) else None)
            except (ValueError, TypeError) as exc:
                m = _SAMPLE_ERR.match(str(exc))
                if m and int(m.group(2)) < len(batch):
                    j = b + int(m.group(2))
                    raise type(exc)(f"row {row_of[j]} (sample {samples[j]['sample']}): {m.group(1)}: "
                                    f"{m.group(3)}") from None
                raise
            h = h.float().cpu()
            feats.append(h)
            overall.append(model.overall_from_features(h).float().cpu().reshape(-1))
    d = len(schema.names)
    tensors = {
        "features": torch.cat(feats).contiguous(),
        "overall": torch.cat(overall).contiguous(),
        "row": torch.tensor(row_of, dtype=torch.int64),
        "sample": torch.tensor([s["sample"] for s in samples], dtype=torch.int64),
        "targets": torch.tensor([s["targets"] for s in samples], dtype=torch.float64).reshape(len(samples), d),
    }
    return tensors, ids


# ---------------------------------------------------------------------------------------------
# reading a store
# ---------------------------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """A feature store in memory. N samples, H features, D stored target dimensions.

    ``features`` (N, H) float32; ``overall`` (N,) float32; ``targets`` (N, D) float64 (NaN = not
    rated); ``names``: the D dimension names; ``rows``/``samples`` (N,) int64: data row and view;
    ``ids``: per-sample ids (schema ``id_column``) or None; ``manifest``: the store's manifest."""

    features: torch.Tensor
    overall: torch.Tensor
    targets: np.ndarray
    names: tuple[str, ...]
    rows: np.ndarray
    samples: np.ndarray
    ids: list[str] | None
    manifest: dict

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def fingerprint(self) -> dict:
        return dict(self.manifest.get("model") or {"hidden_size": int(self.features.shape[1])})

    @property
    def target_ranges(self) -> dict:
        schema = self.manifest.get("schema")
        return load_schema(schema).target_ranges if schema else {}

    def targets_dict(self) -> dict[str, np.ndarray]:
        return {n: self.targets[:, i] for i, n in enumerate(self.names)}

    def subset(self, index) -> FeatureSet:
        index = np.asarray(index)
        return FeatureSet(
            features=self.features[torch.as_tensor(index, dtype=torch.long)],
            overall=self.overall[torch.as_tensor(index, dtype=torch.long)],
            targets=self.targets[index], names=self.names, rows=self.rows[index], samples=self.samples[index],
            ids=None if self.ids is None else [self.ids[i] for i in index], manifest=self.manifest,
        )


def load_features(path: str | os.PathLike, *, allow_partial: bool = False) -> FeatureSet:
    """Read a store written by :func:`extract_features`. Missing chunks (an unfinished run) are an
    error naming them, unless ``allow_partial``."""
    from safetensors import safe_open

    out = Path(os.fspath(path))
    mpath = out / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{out}: no {MANIFEST}; not a feature store (run `multitap-rl extract` first)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FEATURES_FORMAT:
        raise ValueError(f"{mpath}: not a multitap-rl feature store")
    n, c = int(manifest["n_rows"]), int(manifest["chunk_size"])
    parts: dict[str, list] = {k: [] for k in ("features", "overall", "row", "sample", "targets")}
    ids: list[str] | None = []
    missing = []
    for k in range(math.ceil(n / c)):
        p = _chunk_path(out, k)
        start, stop = k * c, min((k + 1) * c, n)
        if not _chunk_ok(p, start, stop):
            missing.append(k)
            continue
        with safe_open(str(p), framework="pt") as f:
            for key in parts:
                parts[key].append(f.get_tensor(key))
            meta = f.metadata() or {}
        if ids is not None:
            ids = ids + json.loads(meta["ids"]) if "ids" in meta else None
    if missing and not allow_partial:
        raise ValueError(f"{out}: extraction is unfinished ({len(missing)} of {math.ceil(n / c)} chunks missing, "
                         f"first rows {missing[0] * c}..); rerun the same `extract` command to resume")
    if not parts["features"]:
        raise ValueError(f"{out}: no extracted chunks")
    names = tuple(manifest.get("dims") or ())
    feats = torch.cat(parts["features"]).float()
    return FeatureSet(
        features=feats,
        overall=torch.cat(parts["overall"]).float(),
        targets=torch.cat(parts["targets"]).double().numpy().reshape(feats.shape[0], len(names)),
        names=names,
        rows=torch.cat(parts["row"]).numpy(),
        samples=torch.cat(parts["sample"]).numpy(),
        ids=ids,
        manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------
# targets from a file
# ---------------------------------------------------------------------------------------------
def _target_value(v, where: str) -> float:
    if v is None or v == "":
        return math.nan
    if isinstance(v, bool):
        return float(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {v!r} is not a number") from None
    if math.isinf(x):
        raise ValueError(f"{where}: value is infinite")
    return x


def read_targets(path: str | os.PathLike, n: int, *, ids: Sequence[str] | None = None,
                 dims: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Targets from a JSONL/JSON or CSV file: one row per sample (in store order), or rows with an
    ``id`` field matched to the store's ids. Columns are dimensions (all numeric columns but ``id``
    unless ``dims`` names them); empty/null = NaN (not rated)."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise FileNotFoundError(f"targets {os.fspath(path)!r}: no such file")
    if p.suffix.lower() == ".csv":
        import csv

        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = _read_json_rows(p)
    if not rows:
        raise ValueError(f"{p}: no rows")
    if dims is None:
        dims = [k for k in rows[0] if k not in ("id", "_line")]
    if not dims:
        raise ValueError(f"{p}: no target columns")
    by_id = "id" in rows[0]
    if by_id and ids is not None:
        index = {}
        for i, r in enumerate(rows):
            rid = str(r.get("id"))
            if rid in index:
                raise ValueError(f"{p}: row {i + 1}: id {rid!r} repeats")
            index[rid] = r
        absent = [i for i in ids if i not in index]
        if absent:
            raise ValueError(f"{p}: no targets for {len(absent)} sample id(s), e.g. {absent[:3]}")
        rows = [index[i] for i in ids]
    elif len(rows) != n:
        raise ValueError(f"{p} has {len(rows)} target rows but the features have {n} samples; they must match one "
                         "to one (in order, or by an 'id' column when the store has ids)")
    out = {}
    for d in dims:
        col = np.empty(n)
        for i, r in enumerate(rows):
            if d not in r:
                raise ValueError(f"{p}: row {i + 1}: missing column {d!r}")
            col[i] = _target_value(r[d], f"{p}: row {i + 1}, column {d!r}")
        out[d] = col
    return out


# ---------------------------------------------------------------------------------------------
# fit and evaluate
# ---------------------------------------------------------------------------------------------
def split_rows(fs: FeatureSet, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sample indices, split by **data row** (all samples of a row on one side),
    deterministically from ``seed``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rows = np.unique(fs.rows)
    n_val = int(round(len(rows) * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    perm = np.random.default_rng(seed).permutation(rows)
    val_rows = np.sort(perm[:n_val])
    is_val = np.isin(fs.rows, val_rows)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _targets_for(fs: FeatureSet, targets, dims: Sequence[str] | None) -> dict[str, np.ndarray]:
    if targets is None:
        if not fs.names:
            raise ValueError("the feature store holds no targets (extracted without a schema with dimensions); "
                             "pass a targets file")
        t = fs.targets_dict()
    elif isinstance(targets, Mapping):
        t = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in targets.items()}
        for k, v in t.items():
            if v.shape[0] != len(fs):
                raise ValueError(f"target {k!r} has {v.shape[0]} values but the features have {len(fs)} samples")
    else:
        t = read_targets(targets, len(fs), ids=fs.ids, dims=dims)
    if dims is not None:
        unknown = [d for d in dims if d not in t]
        if unknown:
            raise ValueError(f"unknown dimension(s) {unknown}; the targets have {list(t)}")
        t = {d: t[d] for d in dims}
    return t


def fit_heads(
    features: FeatureSet | str | os.PathLike,
    targets=None,
    *,
    dims: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    standardize: bool = True,
    nan_policy: str = "error",
    val_fraction: float = 0.0,
    seed: int = 0,
    tol: float = 0.5,
) -> tuple[RidgeHeads, dict | None]:
    """Fit ridge heads on a feature store. Returns ``(heads, held-out report or None)``.

    ``targets``: ``None`` (the targets stored by ``extract`` from the schema), a file
    (:func:`read_targets`) or ``{dim: (N,)}``. ``val_fraction`` > 0 holds out that fraction of data
    rows, fits on the rest and reports per-dimension metrics on the held-out rows."""
    fs = features if isinstance(features, FeatureSet) else load_features(features)
    t = _targets_for(fs, targets, dims)
    t_fit = {k: v for k, v in t.items() if k != "overall"}
    if not t_fit:
        raise ValueError("no dimension to fit ('overall' is the stage-1 head's)")
    train, val = split_rows(fs, val_fraction, seed) if val_fraction > 0 else (np.arange(len(fs)), np.array([], int))
    ranges = {k: v for k, v in fs.target_ranges.items() if k in t_fit}
    heads = RidgeHeads.fit(
        fs.features[torch.as_tensor(train)], {k: v[train] for k, v in t_fit.items()},
        alphas=alphas, standardize=standardize, nan_policy=nan_policy, overall=fs.overall[torch.as_tensor(train)],
        fingerprint=fs.fingerprint, target_ranges=ranges,
        meta={"features": str(fs.manifest.get("data")), "schema": (fs.manifest.get("schema") or {}).get("name"),
              "val_fraction": val_fraction, "seed": seed},
    )
    report = None
    if val.size:
        sub = fs.subset(val)
        report = evaluate_heads(heads, sub, {k: v[val] for k, v in t.items()}, tol=tol)
    return heads, report


def evaluate_heads(heads: RidgeHeads | None, features: FeatureSet | str | os.PathLike, targets=None, *,
                   dims: Sequence[str] | None = None, tol: float = 0.5, pairs: str = "auto") -> dict:
    """Per-dimension metrics of ``heads`` (and of ``overall`` if the targets have an ``overall``
    column) on a feature store; see :func:`~multitap_rl.metrics.dimension_report`.

    ``pairs``: which sample pairs ``pairwise_acc`` compares -- ``"rows"`` (within a data row, e.g.
    response_1 vs response_2), ``"all"``, or ``"auto"`` (rows when rows have several samples)."""
    from ..metrics import dimension_report

    fs = features if isinstance(features, FeatureSet) else load_features(features)
    t = _targets_for(fs, targets, dims)
    preds: dict[str, np.ndarray] = {}
    if heads is not None:
        heads.check_compatible(int(fs.features.shape[1]), fs.fingerprint.get("checkpoint"),
                               where="heads", strict=True)
        out = heads.predict(fs.features)
        preds.update({k: v.double().numpy() for k, v in out.items()})
    preds["overall"] = fs.overall.double().numpy()
    common = [k for k in t if k in preds]
    if not common:
        have = list(heads.names) if heads is not None else []
        raise ValueError(f"no target dimension matches a prediction: targets {list(t)}, heads {have} + overall")
    if pairs not in ("auto", "rows", "all"):
        raise ValueError(f"pairs must be 'auto', 'rows' or 'all', got {pairs!r}")
    by_rows = pairs == "rows" or (pairs == "auto" and len(np.unique(fs.rows)) < len(fs))
    return dimension_report({k: preds[k] for k in common}, {k: t[k] for k in common}, tol=tol,
                            groups=fs.rows.tolist() if by_rows else None)
