"""The stage-2 feature store: frozen last-position features of a dataset on disk, resumable.

:func:`extract_features` runs the model over a dataset (a JSONL/JSON file, a ``datasets``
directory from ``save_to_disk``, parquet/CSV, a ``datasets.Dataset`` or a list of dicts) and
writes ``manifest.json`` plus ``chunks/chunk-NNNNNN.safetensors``, chunk ``k`` holding data rows
``[k*C, (k+1)*C)``. Each chunk is written to a temporary file and renamed, so a chunk on disk is
complete; an interrupted run resumes by computing exactly the chunks that are missing (no row
lost, none computed twice).

Resuming is allowed only into the *same input*: the manifest records a content fingerprint of the
data (a digest of the data file, the ``datasets`` fingerprint, or a digest of in-memory rows, plus
split and row limit), the schema, the chunk size and what identifies the model's features; a
resume with any of them different is refused, naming the differences (``overwrite=True`` /
``--overwrite`` starts again). Image *files* a row names (a path in a JSONL/CSV/parquet row, a
``datasets`` image column stored as a path) are not part of the data's digest, so each chunk also
records a content digest of every sample's image file (chunk metadata ``images``); a resume
re-hashes the files of the chunks already written and refuses if any changed, naming the rows and
files (images stored in the data itself -- bytes, arrays, in-memory PIL images -- are covered by
the data fingerprint).

Distributed (``accelerate launch`` / ``torchrun``; any run where ``torch.distributed`` is
initialised): rank ``r`` of ``W`` computes the chunks ``k`` with ``k % W == r`` into the same store,
which must be on a filesystem every rank sees. Chunk ``k`` holds rows ``[k*C, (k+1)*C)`` whoever
wrote it, so the merged store is the 1-process store (same ids, order and features); rank 0 writes
the manifest, and each rank resumes its own missing chunks (a resume may use another number of
processes: presence is per chunk).

Chunk tensors: ``features`` (S, H) float32, ``overall`` (S,) float32, ``row`` (S,) int64 (data
row), ``sample`` (S,) int64 (view within the row), ``targets`` (S, D) float64 (NaN = not rated).
:func:`load_features` reads a store back as a :class:`FeatureSet`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.rows import RowSource, digest_files, digest_rows, open_rows
from ..errors import DataError, SampleError
from ..schemas import ObjectiveSchema, load_schema

__all__ = [
    "FEATURES_FORMAT",
    "FeatureSet",
    "check_target_columns",
    "data_fingerprint",
    "extract_features",
    "load_features",
    "model_identity",
]

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "multitap-rl/features"
FEATURES_VERSION = 3  # 3: chunks record the content digest of each sample's image file
MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"
IMAGE_DIGESTS = "images"  # chunk metadata: JSON list, per sample, of its image file's digest (or null)
# what must match to resume: for the model, what changes the features (not where it lives)
_MODEL_IDENTITY = ("hidden_size", "checkpoint", "family", "rope", "image_size", "max_length", "backbone_options")
_RESUME_KEYS = ("format", "version", "n_rows", "chunk_size", "data", "schema", "model")


def model_identity(model) -> dict:
    """What identifies the features a model extracts (saved with feature stores and heads)."""
    info = getattr(model, "info", {}) or {}
    return {
        "hidden_size": int(model.hidden_size),
        "checkpoint": info.get("fingerprint"),
        "checkpoint_name": info.get("checkpoint"),
        "base_model": info.get("base_model"),
        "family": info.get("family"),
        **model.backbone.settings.as_dict(),
    }


# ---------------------------------------------------------------------------------------------
# the input's content fingerprint
# ---------------------------------------------------------------------------------------------
def data_fingerprint(data, src: RowSource, *, split: str, limit: int | None) -> dict:
    """A content fingerprint of the rows ``src`` reads from ``data``: the file's digest, a
    ``save_to_disk`` directory's data files' digest, a ``datasets.Dataset``'s own fingerprint, or a
    digest of in-memory rows (images by pixels) -- plus the split and row limit. Two inputs with the
    same fingerprint hold the same rows in the same order."""
    fp: dict = {"name": src.name, "rows": len(src), "split": split, "limit": limit}
    if isinstance(data, (str, os.PathLike)):
        path = Path(os.fspath(data)).expanduser()
        if path.is_file():
            fp["digest"] = digest_files([path])
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".arrow", ".parquet", ".json"))
            fp["digest"] = digest_files(files)
    elif hasattr(data, "_fingerprint") and hasattr(data, "column_names"):
        fp["digest"] = f"datasets:{data._fingerprint}"
    else:
        fp["digest"] = digest_rows(src.rows(0, len(src)))
    return fp


# ---------------------------------------------------------------------------------------------
# the target columns exist (checked before any work)
# ---------------------------------------------------------------------------------------------
def check_target_columns(schema: ObjectiveSchema, src: RowSource, *, given_by: str | None = None) -> None:
    """A ``DataError`` if a dimension of ``schema`` reads a column that no row of ``src`` has: a
    misspelt column would otherwise be stored as an all-NaN target without a word. The message
    names the column (and ``given_by``, the option that named it, e.g. ``"--target-columns"``),
    suggests the nearest column name and lists the data's columns. A column that some rows leave
    out or null is fine (those samples are unrated, NaN)."""
    have = src.columns()
    for d in schema.dimensions:
        for view in schema.samples:
            col = d.source(view.tag)
            if col in have:
                continue
            names = [str(c) for c in have]
            near = difflib.get_close_matches(col, names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
            via = f"given by {given_by}" if given_by else f"dimension {d.name!r} of schema {schema.name!r}"
            raise DataError(f"{src.name}: no column {col!r} ({via}); {hint}the data's columns are: "
                            f"{shown or 'none'}")


# ---------------------------------------------------------------------------------------------
# the image files' content fingerprint (per sample, stored in each chunk)
# ---------------------------------------------------------------------------------------------
def _stored_image_values(src: RowSource, schema: ObjectiveSchema, start: int, stop: int) -> list:
    """Per sample of rows ``[start, stop)`` (rows in order, each row's views in order, as
    :meth:`ObjectiveSchema.expand` yields them): the image value as the data stores it, relative
    paths resolved. A ``datasets`` image column is read undecoded (``{"bytes", "path"}``), so an
    image stored as a path is seen as that path rather than as the pixels decoded from it."""
    views = schema.samples
    if isinstance(src.data, list):
        rows = src.rows(start, stop)
        values = [row.get(v.image) for row in rows for v in views]
    else:  # a datasets.Dataset: its arrow storage, nothing decoded
        stop = min(stop, len(src))
        cols = [c for c in dict.fromkeys(v.image for v in views) if c in src.data.column_names]
        table = src.data.select_columns(cols).with_format("arrow")[start:stop] if cols else None
        stored = {c: table.column(c).to_pylist() for c in cols}
        values = [stored[v.image][i] if v.image in stored else None for i in range(stop - start) for v in views]
    return [src.resolve_image(v) for v in values]


def _file_digest(path: str, cache: dict[str, str]) -> str:
    """``"blake2b:..."`` of the bytes of the file ``path`` (``"unreadable: ..."`` if it cannot be
    read: the model names that problem when it reads the image)."""
    if path not in cache:
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            cache[path] = "blake2b:" + h.hexdigest()
        except OSError as exc:
            cache[path] = f"unreadable: {exc.strerror or type(exc).__name__}"
    return cache[path]


def _image_digests(src: RowSource, schema: ObjectiveSchema, start: int, stop: int) -> list[tuple[str, str] | None]:
    """Per sample of rows ``[start, stop)``: ``(path, content digest)`` of its image file, or None
    for an image held in the data itself (bytes, arrays, PIL images: the data fingerprint covers
    them). What a chunk's features depend on beyond the data file."""
    cache: dict[str, str] = {}
    out: list[tuple[str, str] | None] = []
    for value in _stored_image_values(src, schema, start, stop):
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            out.append((path, _file_digest(path, cache)))
        else:
            out.append(None)
    return out


def _changed_images(out: Path, src: RowSource, schema: ObjectiveSchema, chunks: list[int],
                    chunk_size: int) -> list[str]:
    """For the written ``chunks``: one line per sample whose image file's content differs from the
    one its features were extracted from (or whose chunk records no image digests)."""
    from safetensors import safe_open

    changed = []
    views = schema.samples
    for k in chunks:
        start, stop = k * chunk_size, min((k + 1) * chunk_size, len(src))
        with safe_open(str(_chunk_path(out, k)), framework="pt") as f:
            raw = (f.metadata() or {}).get(IMAGE_DIGESTS)
        try:
            stored = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError:
            stored = None
        now = _image_digests(src, schema, start, stop)
        if not isinstance(stored, list) or len(stored) != len(now):
            changed.append(f"{_chunk_path(out, k).name}: records no image digests for rows {start}..{stop - 1}")
            continue
        for j, (old, new) in enumerate(zip(stored, now)):
            if (new[1] if new else None) != old:
                row, view = start + j // len(views), views[j % len(views)]
                tag = f" (sample {view.tag})" if len(views) > 1 else ""
                gone = f" ({new[1]})" if new and new[1].startswith("unreadable") else ""
                changed.append(f"{src.where(row)}{tag}: image {new[0] if new else '?'}{gone}")
    return changed


def _refuse_changed_images(out: Path, changed: list[str]) -> None:
    """The DataError a resume over changed image files raises, naming (some of) them."""
    shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
    raise DataError(f"{out}: the image file of {len(changed)} sample(s) changed since their features were extracted "
                    f"({shown}); "
                    "resuming would mix features of the old and the new images: restore the files, or pass "
                    "overwrite=True (--overwrite) to extract every row again")


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------
def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
    rank: int | None = None,
    world_size: int | None = None,
) -> Path:
    """Write the features of every sample of ``data`` to the store ``out`` (resuming if present).

    Args:
        model: a :class:`~multitap_rl.model.MultiTapModel` (``features``, ``overall_from_features``).
        data: see :func:`~multitap_rl.data.rows.open_rows`.
        schema: how rows become samples and which targets to store (:func:`~multitap_rl.schemas.load_schema`);
            default: ``image``/``text`` (+ ``question`` if the first row has one) columns, no targets.
        chunk_size: data rows per chunk file (the unit of resumption).
        batch_size: samples per model call.
        limit: only the first ``limit`` rows.
        overwrite: discard an existing store at ``out`` instead of resuming it.
        on_chunk: called with each chunk index after it is written (progress hooks, tests).
        rank, world_size: this process's share: the chunks ``k`` with ``k % world_size == rank``.
            Default: from ``torch.distributed`` when it is initialised (then every rank must call
            this together; it returns once every chunk is written), else 0 and 1. Given
            explicitly, no process talks to another: rank 0 must have created the store first
            (``overwrite`` is applied by rank 0 only).

    Returns the store directory.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..distributed import barrier, rank_and_world

    # 1. Inputs, schema, manifest (with the input's content fingerprint).
    if chunk_size < 1 or batch_size < 1:
        raise DataError("chunk_size and batch_size must be >= 1")
    dist_rank, dist_world = rank_and_world()
    collective = rank is None and world_size is None and dist_world > 1
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    if isinstance(rank, bool) or isinstance(world_size, bool) or not (isinstance(rank, int) and
                                                                      isinstance(world_size, int)) \
            or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank!r} / world_size {world_size!r}: need 0 <= rank < world_size")
    src = open_rows(data, split=split, limit=limit)
    if schema is None:
        first = src.rows(0, 1)[0]
        schema = ObjectiveSchema.simple(question="question" if first.get("question") is not None else None)
    schema = load_schema(schema)
    out = Path(os.fspath(out))
    # Target columns the data lacks are refused before anything is written; when resuming, after
    # the store's own check, which names every difference from the run that wrote it.
    resuming = not overwrite and (out / MANIFEST).is_file()
    if not resuming:
        check_target_columns(schema, src)
    manifest = {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "n_rows": len(src),
        "chunk_size": int(chunk_size),
        "data": data_fingerprint(data, src, split=split, limit=limit),
        "schema": schema.to_dict(),
        "dims": list(schema.names),
        "model": model_identity(model),
    }
    # Rank 0 creates (or checks, or with overwrite empties) the store; the others then only check
    # its manifest (cleaning up there could delete a chunk rank 0 is already writing).
    if rank == 0:
        _prepare_store(out, manifest, overwrite)
    if collective:
        barrier()
    if rank != 0:
        _check_store(out, manifest)
    if resuming:
        check_target_columns(schema, src)

    # 2. This rank's chunks not yet on disk.
    n_chunks = math.ceil(len(src) / chunk_size)
    todo, done = [], []
    done_rows = total_rows = 0
    for k in range(rank, n_chunks, world_size):
        start, stop = k * chunk_size, min((k + 1) * chunk_size, len(src))
        total_rows += stop - start
        if _chunk_ok(_chunk_path(out, k), start, stop):
            done_rows += stop - start
            done.append(k)
        else:
            todo.append(k)
    # The written chunks' features came from the image files as they were then: same content only.
    changed = _changed_images(out, src, schema, done, chunk_size)
    if changed:
        _refuse_changed_images(out, changed)
    if done_rows:
        logger.info("resuming %s: %d of %d rows already extracted%s", out, done_rows, total_rows,
                    f" (rank {rank} of {world_size})" if world_size > 1 else "")

    # 3. Compute and write each missing chunk atomically.
    bar = tqdm(total=total_rows, initial=done_rows, desc="extracting" if world_size == 1 else f"extracting [{rank}]",
               unit="row", disable=not progress or rank != 0)
    try:
        for k in todo:
            start, stop = k * chunk_size, min((k + 1) * chunk_size, len(src))
            digests = [d[1] if d else None for d in _image_digests(src, schema, start, stop)]  # before reading
            tensors, ids = _extract_chunk(model, schema, src, start, stop, batch_size)
            meta = {"start": str(start), "stop": str(stop), "format": FEATURES_FORMAT,
                    IMAGE_DIGESTS: json.dumps(digests)}
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
    if collective:  # the store is complete once every rank is done
        barrier()
        if rank == 0:
            missing = [k for k in range(n_chunks)
                       if not _chunk_ok(_chunk_path(out, k), k * chunk_size, min((k + 1) * chunk_size, len(src)))]
            if missing:
                raise DataError(f"{out}: after every rank finished, {len(missing)} chunk(s) are missing here (first: "
                                f"{missing[0]}); the output directory must be on a filesystem all ranks share")
    return out


def _check_store(out: Path, manifest: dict) -> None:
    """A non-zero rank's check of the store rank 0 prepared: its manifest is this input's."""
    mpath = out / MANIFEST
    try:
        old = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise DataError(f"{mpath}: missing on this rank after rank 0 wrote it; the output directory must be on a "
                        "filesystem all ranks share") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{mpath}: corrupt manifest") from None
    diffs = [k for k in _RESUME_KEYS if _identity(old, k) != _identity(manifest, k)]
    if diffs:
        raise DataError(f"{out}: this rank's input or model differs from rank 0's in {diffs}; every rank must extract "
                        "the same data with the same model")


def _prepare_store(out: Path, manifest: dict, overwrite: bool) -> None:
    mpath = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; pass a directory")
    if overwrite and mpath.is_file():
        for f in [*(out / CHUNK_DIR).glob("*.safetensors"), *(out / CHUNK_DIR).glob(".*.tmp")]:
            f.unlink()
        mpath.unlink()
        if (out / CHUNK_DIR).is_dir() and not any((out / CHUNK_DIR).iterdir()):
            (out / CHUNK_DIR).rmdir()
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{mpath}: corrupt manifest; pass overwrite=True (--overwrite) to start again") from None
        diffs = [k for k in _RESUME_KEYS if _identity(old, k) != _identity(manifest, k)]
        if diffs:
            detail = "; ".join(f"{k}: stored {_short(_identity(old, k))} vs now {_short(_identity(manifest, k))}"
                               for k in diffs)
            raise DataError(f"{out} holds features of a different input or model ({detail}); resuming would mix "
                            "them: use another directory or overwrite=True (--overwrite)")
    elif out.is_dir() and any(p.name != CHUNK_DIR or any(p.iterdir()) for p in out.iterdir()):
        raise DataError(f"output directory {out} is not empty and holds no feature store; use an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    if not mpath.is_file():
        _atomic_json(mpath, manifest)
    (out / CHUNK_DIR).mkdir(exist_ok=True)
    for stale in (out / CHUNK_DIR).glob(".*.tmp"):  # left by an interrupted write
        stale.unlink()


def _identity(manifest: dict, key: str):
    v = manifest.get(key)
    if key == "model" and isinstance(v, dict):
        return {k: v.get(k) for k in _MODEL_IDENTITY}
    if key == "data" and isinstance(v, dict):
        return {k: v.get(k) for k in ("digest", "rows", "split", "limit")}
    return v


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 120 else s[:117] + "..."


def _extract_chunk(model, schema: ObjectiveSchema, src: RowSource, start: int, stop: int, batch_size: int):
    rows = src.rows(start, stop)
    samples, row_of = [], []
    for i, row in enumerate(rows):
        for s in schema.expand(row, start + i, where=src.where(start + i)):
            s["image"] = src.resolve_image(s["image"])
            samples.append(s)
            row_of.append(start + i)
    ids = None
    if schema.id_column:
        ids = []
        for s, r in zip(samples, row_of):
            rid = rows[r - start].get(schema.id_column)
            if rid is None:
                raise DataError(f"{src.where(r)}: missing id column {schema.id_column!r}")
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
            except SampleError as exc:
                if exc.index is None or not 0 <= exc.index < len(batch):
                    raise
                j = b + exc.index
                view = f" (sample {schema.samples[samples[j]['sample']].tag})" if len(schema.samples) > 1 else ""
                index, unit, source = _where_args(src, row_of[j])
                raise exc.at(index, unit=unit, source=source, detail=view) from exc
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


def _where_args(src: RowSource, row: int) -> tuple:
    """(index, unit, source) naming data row ``row``: a file's line, or the row index."""
    if src.lines is not None and 0 <= row < len(src.lines):
        return src.lines[row], "line", src.name
    return row, "row", None


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
        raise DataError(f"{out}: no {MANIFEST}; not a feature store (run `multitap-rl extract` first)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{mpath}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FEATURES_FORMAT:
        raise DataError(f"{mpath}: not a multitap-rl feature store")
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
        raise DataError(f"{out}: extraction is unfinished ({len(missing)} of {math.ceil(n / c)} chunks missing, "
                        f"first rows {missing[0] * c}..); rerun the same `extract` command to resume")
    if not parts["features"]:
        raise DataError(f"{out}: no extracted chunks")
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
