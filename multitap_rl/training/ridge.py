"""Fitting stage-2 heads: multi-output ridge regression with the penalty chosen per dimension.

* :func:`fit_ridge_loo` -- ridge with an unpenalised intercept and ``alpha`` chosen **per
  dimension** by exact leave-one-out error (the closed form through one eigendecomposition, as
  scikit-learn's ``RidgeCV`` does). The reference picked alpha by *training* MSE, which always
  selects the smallest alpha on offer.
* :func:`fit_ridge_heads` -- :class:`~multitap_rl.heads.RidgeHeads` for named dimensions from
  features and targets (NaN policy, standardisation folded into the coefficients, training
  statistics for fixed normalisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
from dataclasses import dataclass

import numpy as np

from ..errors import HeadsError
from ..heads import RidgeHeads, check_head_names

__all__ = ["NAN_POLICIES", "RidgeFit", "default_alpha_grid", "fit_ridge_heads", "fit_ridge_loo"]

NAN_POLICIES = ("error", "drop")

logger = logging.getLogger(__name__)


def _as_matrix(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise HeadsError(f"{what} must be numeric, got {type(x).__name__}") from None


def default_alpha_grid(scale: float = 1.0) -> np.ndarray:
    """``scale * logspace(-6, 4, 41)``; :func:`fit_ridge_loo` passes the mean eigenvalue of the
    centred Gram matrix as ``scale`` so the grid is independent of the features' units."""
    return scale * np.logspace(-6, 4, 41)


@dataclass
class RidgeFit:
    """Result of :func:`fit_ridge_loo` for D targets on P features.

    ``coef``: (P, D) float64; ``intercept``: (D,); ``alpha``: (D,) chosen penalties;
    ``alphas``: (A,) the grid; ``loo_mse``: (A, D) leave-one-out mean squared error per alpha."""

    coef: np.ndarray
    intercept: np.ndarray
    alpha: np.ndarray
    alphas: np.ndarray
    loo_mse: np.ndarray


def fit_ridge_loo(X, Y, alphas: Sequence[float] | None = None, *, block: int = 4096) -> RidgeFit:
    """Ridge regression ``Y ~ X W + c`` with alpha chosen per column of ``Y`` by exact LOO error.

    With ``Xc = X - mean`` and the eigendecomposition of ``Xc^T Xc`` (or ``Xc Xc^T`` when N < P),
    the hat matrix for penalty ``a`` is ``H = Z diag(1/(s2 + a)) Z^T + 1/N`` (``Z = Xc V``), and the
    LOO residual of row i is ``(y_i - yhat_i) / (1 - H_ii)``; all alphas cost one decomposition.

    Args:
        X: (N, P) features. Y: (N, D) targets (or (N,)). Both finite.
        alphas: penalties to try (> 0); default :func:`default_alpha_grid` scaled to ``X``.
        block: rows per block when forming LOO residuals (bounds memory at block x (r + A x D)).
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise HeadsError(f"features {X.shape} and targets {Y.shape} do not have the same rows")
    n, p = X.shape
    if n < 3:
        raise HeadsError(f"need at least 3 rows to fit and cross-validate, got {n}")

    # 1. Centre (the intercept is not penalised).
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean

    # 2. One symmetric eigendecomposition: of the P x P Gram matrix or the N x N kernel.
    primal = n >= p
    G = Xc.T @ Xc if primal else Xc @ Xc.T
    s2, vecs = np.linalg.eigh(G)
    keep = s2 > max(s2.max(), 0.0) * 1e-12 * max(n, p)
    s2, vecs = s2[keep], vecs[:, keep]
    if s2.size == 0:
        raise HeadsError("features are constant: nothing to fit")
    Z = Xc @ vecs if primal else vecs * np.sqrt(s2)  # (N, r) = U diag(s)
    ZtY = Z.T @ Yc  # (r, D)
    if primal:
        del Xc  # not needed again: one N x P copy less at peak

    if alphas is None:
        grid = default_alpha_grid(float(s2.sum() / p))
    else:
        grid = np.asarray(list(alphas), dtype=np.float64).reshape(-1)
        if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
            raise HeadsError(f"alphas must be finite and > 0, got {list(alphas)}")
    inv = 1.0 / (s2[:, None] + grid[None, :])  # (r, A)

    # 3. LOO residuals for every alpha and target, block by block over rows.
    A, D = grid.size, Y.shape[1]
    sse = np.zeros((A, D))
    beta = ZtY[:, None, :] * inv[:, :, None]  # (r, A, D): fitted = Z @ beta[:, a, :]
    beta2 = beta.reshape(beta.shape[0], A * D)
    for start in range(0, n, block):
        z = Z[start : start + block]
        hat = (z * z) @ inv + 1.0 / n  # (b, A) diagonal of the hat matrix incl. intercept
        fitted = (z @ beta2).reshape(-1, A, D)
        denom = np.maximum(1.0 - hat, 1e-12)[:, :, None]
        resid = (Yc[start : start + block, None, :] - fitted) / denom
        sse += np.einsum("bad,bad->ad", resid, resid)
    loo = sse / n
    best = np.argmin(loo, axis=0)  # (D,)

    # 4. Coefficients at each target's alpha: W = V diag(1/(s2+a)) Z^T y (primal) or Xc^T U ... (dual).
    coef = np.empty((p, D))
    for d in range(D):
        w = beta[:, best[d], d]
        coef[:, d] = vecs @ w if primal else Xc.T @ (vecs @ (w / np.sqrt(s2)))
    intercept = y_mean - x_mean @ coef
    return RidgeFit(coef=coef, intercept=intercept, alpha=grid[best], alphas=grid, loo_mse=loo)


def fit_ridge_heads(
    features,
    targets,
    names: Sequence[str] | None = None,
    *,
    alphas: Sequence[float] | None = None,
    standardize: bool = True,
    nan_policy: str = "error",
    overall=None,
    fingerprint: Mapping | None = None,
    target_ranges: Mapping[str, Sequence[float]] | None = None,
    meta: Mapping | None = None,
) -> RidgeHeads:
    """Fit one ridge head per dimension with leave-one-out alpha (see :func:`fit_ridge_loo`).

    Args:
        features: (N, H) hidden states (tensor or array), finite.
        targets: (N, D) array/tensor with ``names``, or ``{name: (N,)}``.
        alphas: penalty grid (default: scale-free log grid, per dimension choice).
        standardize: z-score each feature (training mean/std) before the penalty applies;
            folded into the saved coefficients, so prediction is one matmul either way.
        nan_policy: NaN targets (unrated samples): ``"error"`` (default) raises naming the
            dimension and rows; ``"drop"`` leaves those rows out of that dimension's fit only.
        overall: optional (N,) stage-1 scores of the same rows; adds ``stats["overall"]``.
        fingerprint: the backbone's identity (``model.info``/feature store), saved with the heads.
        target_ranges: ``{name: (lo, hi)}`` valid target range (default: observed min/max).
    """
    # 1. Validate inputs.
    if nan_policy not in NAN_POLICIES:
        raise HeadsError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    X = _as_matrix(features, "features")
    if X.ndim != 2:
        raise HeadsError(f"features must be (N, H), got shape {X.shape}")
    bad_rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad_rows.size:
        raise HeadsError(f"features of row {int(bad_rows[0])} are not finite ({bad_rows.size} such rows)")
    if isinstance(targets, Mapping):
        if names is not None and list(names) != list(targets):
            targets = {n: targets[n] for n in names}
        names = list(targets)
        cols = []
        for n in names:
            col = _as_matrix(targets[n], f"targets[{n!r}]").reshape(-1)
            if col.shape[0] != X.shape[0]:
                raise HeadsError(f"target {n!r} has {col.shape[0]} rows but there are {X.shape[0]} feature rows")
            cols.append(col)
        Y = np.stack(cols, axis=1)
    else:
        Y = _as_matrix(targets, "targets")
        if Y.ndim == 1:
            Y = Y[:, None]
        if names is None:
            raise HeadsError("pass names= for a targets array (or targets as {name: values})")
        names = list(names)
        if Y.ndim != 2 or Y.shape[1] != len(names):
            raise HeadsError(f"targets must be (N, {len(names)}) for names {names}, got shape {Y.shape}")
    names = check_head_names(names)
    if Y.shape[0] != X.shape[0]:
        raise HeadsError(f"{Y.shape[0]} target rows but {X.shape[0]} feature rows; they must match one to one")
    if np.isinf(Y).any():
        d = int(np.flatnonzero(np.isinf(Y).any(axis=0))[0])
        raise HeadsError(f"target {names[d]!r} is infinite at row {int(np.flatnonzero(np.isinf(Y[:, d]))[0])}")
    big = np.abs(np.nan_to_num(Y)) > 1e150
    if big.any():
        d = int(np.flatnonzero(big.any(axis=0))[0])
        raise HeadsError(f"target {names[d]!r} is too large to fit at row {int(np.flatnonzero(big[:, d])[0])} "
                         f"(|value| > 1e150; its square overflows float64): rescale the targets")
    nan = np.isnan(Y)
    if nan.any() and nan_policy == "error":
        d = int(np.flatnonzero(nan.any(axis=0))[0])
        rows = np.flatnonzero(nan[:, d])
        raise HeadsError(f"target {names[d]!r} is NaN at row(s) {rows[:5].tolist()}"
                         f"{' ...' if rows.size > 5 else ''} ({int(nan.sum())} NaN values in all); "
                         "pass nan_policy='drop' to leave unrated rows out of that dimension's fit")

    # 2. Fit each group of dimensions that share the same rated rows, on exactly those rows
    #    (standardisation too: a dimension fit with dropped rows equals a fit on its rows alone).
    coef = np.zeros((X.shape[1], len(names)))
    intercept = np.zeros(len(names))
    chosen, curves, used = {}, {}, {}
    grid_out = None
    groups: dict[bytes, list[int]] = {}
    for d in range(len(names)):
        groups.setdefault((~nan[:, d]).tobytes(), []).append(d)
    for mask_bytes, dims in groups.items():
        mask = np.frombuffer(mask_bytes, dtype=bool)
        if mask.sum() < 3:
            raise HeadsError(f"dimension(s) {[names[d] for d in dims]} have {int(mask.sum())} rated rows; "
                             "need >= 3")
        Xg = X if mask.all() else X[mask]
        mu = Xg.mean(0) if standardize else np.zeros(X.shape[1])
        sd = Xg.std(0) if standardize else np.ones(X.shape[1])
        sd = np.where(sd > 0, sd, 1.0)  # constant features: coefficient 0 either way
        fit = fit_ridge_loo((Xg - mu) / sd, Y[mask][:, dims], alphas)
        for j, d in enumerate(dims):
            coef[:, d] = fit.coef[:, j] / sd
            intercept[d] = fit.intercept[j] - float((mu / sd) @ fit.coef[:, j])
            chosen[names[d]] = float(fit.alpha[j])
            curves[names[d]] = [float(v) for v in fit.loo_mse[:, j]]
            used[names[d]] = int(mask.sum())
        grid_out = fit.alphas
        if alphas is None and len(groups) > 1:
            grid_out = None  # each group's default grid is scaled to its own rows

    # 3. Training statistics (and a clear error where the arithmetic overflowed).
    with np.errstate(over="ignore", invalid="ignore"):
        pred = X @ coef + intercept
    bad = [n for d, n in enumerate(names)
           if not (np.isfinite(coef[:, d]).all() and np.isfinite(intercept[d]) and np.isfinite(pred[:, d]).all())]
    if bad:
        raise HeadsError(f"fitting {bad} overflowed float64 (targets or features too large, e.g. |value| > 1e150); "
                         "rescale them before fitting")
    stats, target_stats, ranges = {}, {}, {}
    for d, n in enumerate(names):
        rated = ~nan[:, d]
        y = Y[rated, d]
        std = float(pred[:, d].std())
        if not std > 0:
            logger.warning("predictions of %r are constant on the training rows; fixed normalisation "
                           "will use std 1", n)
            std = 1.0
        stats[n] = (float(pred[:, d].mean()), std)
        target_stats[n] = {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()),
                           "max": float(y.max()), "n": int(rated.sum())}
        r = (target_ranges or {}).get(n)
        ranges[n] = [float(r[0]), float(r[1])] if r is not None else [float(y.min()), float(y.max())]
    if overall is not None:
        o = _as_matrix(overall, "overall").reshape(-1)
        if o.shape[0] != X.shape[0] or not np.isfinite(o).all():
            raise HeadsError(f"overall must be {X.shape[0]} finite values, got {o.shape[0]}")
        stats["overall"] = (float(o.mean()), float(o.std()) if o.std() > 0 else 1.0)

    info = dict(meta or {})
    info.update({
        "alphas": chosen,
        "alpha_grid": None if grid_out is None else [float(a) for a in grid_out],
        "loo_mse": curves,
        "n_train": used,
        "standardize": bool(standardize),
        "nan_policy": nan_policy,
        "target_ranges": ranges,
        "target_stats": target_stats,
    })
    return RidgeHeads(names, coef, intercept, fingerprint=fingerprint or {"hidden_size": X.shape[1]},
                      stats=stats, meta=info)

