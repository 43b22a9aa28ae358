"""Stage 2 on extracted features: ridge heads and their evaluation.

1. :func:`~multitap_rl.training.features.extract_features` writes a feature store (resumable; see
   :mod:`multitap_rl.training.features`).
2. :func:`fit_heads` fits :class:`~multitap_rl.heads.RidgeHeads` on a store's features with its
   stored targets (from the schema) or a targets file, optionally holding out rows for a report.
3. :func:`evaluate_heads` scores heads (and ``overall``) against targets: a per-dimension report.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.rows import read_json_rows
from ..errors import ConfigError, DataError
from ..heads import RidgeHeads
from .features import FeatureSet, load_features
from .ridge import fit_ridge_heads

__all__ = ["evaluate_heads", "fit_heads", "read_targets", "split_rows"]


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
        raise DataError(f"{where}: {v!r} is not a number") from None
    if math.isinf(x):
        raise DataError(f"{where}: value is infinite")
    return x


def read_targets(path: str | os.PathLike, n: int, *, ids: Sequence[str] | None = None,
                 dims: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Targets from a JSONL/JSON or CSV file: one row per sample (in store order), or rows with an
    ``id`` field matched to the store's ids. Columns are dimensions (all numeric columns but ``id``
    unless ``dims`` names them); empty/null = NaN (not rated)."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise DataError(f"targets {os.fspath(path)!r}: no such file")
    if p.suffix.lower() == ".csv":
        try:
            with open(p, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except UnicodeDecodeError as exc:
            raise DataError(f"{p}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None
    else:
        rows, _ = read_json_rows(p)
    if not rows:
        raise DataError(f"{p}: no rows")
    if dims is None:
        dims = [k for k in rows[0] if k not in ("id", "_line")]
    if not dims:
        raise DataError(f"{p}: no target columns")
    by_id = "id" in rows[0]
    if by_id and ids is not None:
        index = {}
        for i, r in enumerate(rows):
            rid = str(r.get("id"))
            if rid in index:
                raise DataError(f"{p}: row {i + 1}: id {rid!r} repeats")
            index[rid] = r
        absent = [i for i in ids if i not in index]
        if absent:
            raise DataError(f"{p}: no targets for {len(absent)} sample id(s), e.g. {absent[:3]}")
        rows = [index[i] for i in ids]
    elif len(rows) != n:
        raise DataError(f"{p} has {len(rows)} target rows but the features have {n} samples; they must match one "
                         "to one (in order, or by an 'id' column when the store has ids)")
    out = {}
    for d in dims:
        col = np.empty(n)
        for i, r in enumerate(rows):
            if d not in r:
                raise DataError(f"{p}: row {i + 1}: missing column {d!r}")
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
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
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
            raise DataError("the feature store holds no targets (extracted without a schema with dimensions); "
                             "pass a targets file")
        t = fs.targets_dict()
    elif isinstance(targets, Mapping):
        t = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in targets.items()}
        for k, v in t.items():
            if v.shape[0] != len(fs):
                raise DataError(f"target {k!r} has {v.shape[0]} values but the features have {len(fs)} samples")
    else:
        t = read_targets(targets, len(fs), ids=fs.ids, dims=dims)
    if dims is not None:
        unknown = [d for d in dims if d not in t]
        if unknown:
            raise DataError(f"unknown dimension(s) {unknown}; the targets have {list(t)}")
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
        raise DataError("no dimension to fit ('overall' is the stage-1 head's)")
    train, val = split_rows(fs, val_fraction, seed) if val_fraction > 0 else (np.arange(len(fs)), np.array([], int))
    ranges = {k: v for k, v in fs.target_ranges.items() if k in t_fit}
    heads = fit_ridge_heads(
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
        raise DataError(f"no target dimension matches a prediction: targets {list(t)}, heads {have} + overall")
    if pairs not in ("auto", "rows", "all"):
        raise ConfigError(f"pairs must be 'auto', 'rows' or 'all', got {pairs!r}")
    by_rows = pairs == "rows" or (pairs == "auto" and len(np.unique(fs.rows)) < len(fs))
    return dimension_report({k: preds[k] for k in common}, {k: t[k] for k in common}, tol=tol,
                            groups=fs.rows.tolist() if by_rows else None)
