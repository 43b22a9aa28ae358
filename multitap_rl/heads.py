"""Stage-2 ridge heads: named dimensions predicted linearly from the frozen hidden state.

MULTI-TAP's second stage fits ridge regression on the last-position hidden state ``h`` (the same
feature the stage-1 head reads) to predict human-interpretable dimensions. Here:

* :func:`fit_ridge_loo` -- multi-output ridge with an unpenalised intercept and the penalty
  ``alpha`` chosen **per dimension** by exact leave-one-out error (the closed form through one
  eigendecomposition, as scikit-learn's ``RidgeCV`` does). The reference picked alpha by
  *training* MSE, which always selects the smallest alpha on offer.
* :class:`RidgeHeads` -- the fitted heads: ``predict(h) -> {name: (N,)}``, training statistics
  (``stats``, for ``RewardCombiner(normalize="fixed")``), a fingerprint of the backbone whose
  features they were fit on, and ``save``/``load`` as safetensors (coefficients) + JSON (names,
  alphas, target ranges, statistics, fingerprint). No pickle, unless a legacy scikit-learn/joblib
  file is loaded with the explicit ``trust_legacy=True`` opt-in (:meth:`RidgeHeads.load`,
  :func:`convert_legacy_heads`).
* :func:`checkpoint_fingerprint` -- a cheap hash of a loaded checkpoint (``model.info["fingerprint"]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "HEADS_FORMAT",
    "HeadsError",
    "RidgeFit",
    "RidgeHeads",
    "checkpoint_fingerprint",
    "convert_legacy_heads",
    "default_alpha_grid",
    "fit_ridge_loo",
]

logger = logging.getLogger(__name__)

HEADS_FORMAT = "multitap-rl/ridge-heads"
HEADS_VERSION = 1
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads.json"
LEGACY_SUFFIXES = (".joblib", ".pkl", ".pickle", ".sav")
NAN_POLICIES = ("error", "drop")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_RESERVED = ("overall",)  # the stage-1 head's name


class HeadsError(ValueError):
    """Heads that cannot be fit, read or used as asked (bad input, corrupt file, wrong backbone)."""


# ---------------------------------------------------------------------------------------------
# checkpoint fingerprint
# ---------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def checkpoint_fingerprint(backbone_state: Mapping[str, torch.Tensor], head_state: Mapping[str, torch.Tensor],
                           n_small: int = 4) -> str:
    """A cheap identity of a checkpoint: ``"sha256:<32 hex>"``.

    Hashes the sorted ``(key, shape, dtype)`` list of the backbone weights, the bytes of the reward
    head, and the bytes of the ``n_small`` smallest backbone tensors (norm weights and biases, which
    fine-tuning moves). It reads only tensors already in memory; multi-GB shards are not re-hashed.
    ``backbone_state`` should use the module's key names (after remapping), so the released layout
    and a re-saved copy of the same weights agree.
    """
    h = hashlib.sha256(b"multitap-rl checkpoint fingerprint v1\n")
    for key in sorted(backbone_state):
        t = backbone_state[key]
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}\n".encode())
    for key in sorted(head_state):
        h.update(f"head:{key}\n".encode())
        h.update(_tensor_bytes(head_state[key].float()))
    small = sorted(backbone_state, key=lambda k: (backbone_state[k].numel(), k))[:n_small]
    for key in small:
        h.update(f"small:{key}\n".encode())
        h.update(_tensor_bytes(backbone_state[key]))
    return "sha256:" + h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# ridge with leave-one-out alpha
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------
def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise HeadsError("heads need at least one dimension name")
    for n in names:
        if not isinstance(n, str) or not _NAME.match(n):
            raise HeadsError(f"bad dimension name {n!r} (letters, digits, '_', '.', '-'; not starting with a digit)")
        if n in _RESERVED:
            raise HeadsError(f"dimension name {n!r} is reserved for the stage-1 head")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise HeadsError(f"dimension names repeat: {dup}")
    return names


def _as_matrix(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise HeadsError(f"{what} must be numeric, got {type(x).__name__}") from None
    return arr


class RidgeHeads:
    """Linear heads ``h @ coef + intercept`` for named dimensions, fit on one backbone's features.

    Attributes:
        names: dimension names, in output order.
        hidden_size: H, the feature size the heads expect.
        stats: ``{dim: (mean, std)}`` of the heads' predictions on their training features (and
            ``"overall"`` when the stage-1 scores were given at fit time) -- what
            ``RewardCombiner(normalize="fixed", stats=heads.stats)`` z-scores with.
        fingerprint: ``{"hidden_size": H, "checkpoint": "sha256:..." | None, ...}`` of the backbone.
        meta: everything else saved in ``heads.json`` (alphas, CV curves, target ranges and stats).
    """

    def __init__(self, names: Sequence[str], coef, intercept, *, fingerprint: Mapping | None = None,
                 stats: Mapping[str, Sequence[float]] | None = None, meta: Mapping | None = None):
        self.names = _check_names(names)
        coef = torch.as_tensor(_as_matrix(coef, "coef"), dtype=torch.float64)
        intercept = torch.as_tensor(_as_matrix(intercept, "intercept"), dtype=torch.float64).reshape(-1)
        if coef.ndim != 2 or coef.shape[1] != len(self.names):
            raise HeadsError(f"coef must be (hidden_size, {len(self.names)}) for {len(self.names)} names, "
                             f"got {tuple(coef.shape)}")
        if intercept.shape != (len(self.names),):
            raise HeadsError(f"intercept must have {len(self.names)} values, got {tuple(intercept.shape)}")
        if not (torch.isfinite(coef).all() and torch.isfinite(intercept).all()):
            raise HeadsError("coefficients are not finite")
        self.coef, self.intercept = coef, intercept
        self.hidden_size = int(coef.shape[0])
        fp = dict(fingerprint or {})
        fp.setdefault("hidden_size", self.hidden_size)
        fp.setdefault("checkpoint", None)
        if int(fp["hidden_size"]) != self.hidden_size:
            raise HeadsError(f"fingerprint says hidden size {fp['hidden_size']} but coef has {self.hidden_size} rows")
        self.fingerprint = fp
        self.stats: dict[str, tuple[float, float]] = {k: (float(v[0]), float(v[1])) for k, v in (stats or {}).items()}
        self.meta = dict(meta or {})
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"RidgeHeads(names={list(self.names)}, hidden_size={self.hidden_size})"

    # -- prediction --------------------------------------------------------------------------------
    def predict(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """``h``: (N, H) features -> ``{name: (N,) float32}`` in :attr:`names` order, on ``h``'s
        device (computed in float64 on CPU, float32 elsewhere)."""
        if not isinstance(h, torch.Tensor):
            h = torch.as_tensor(_as_matrix(h, "features"))
        if h.ndim != 2 or h.shape[1] != self.hidden_size:
            raise HeadsError(f"features must be (N, {self.hidden_size}), got {tuple(h.shape)}"
                             + (" (heads of another backbone?)" if h.ndim == 2 else ""))
        if not h.dtype.is_floating_point:
            raise HeadsError(f"features must be floating point, got {h.dtype}")
        finite = torch.isfinite(h).all(dim=1)
        if not bool(finite.all()):
            raise HeadsError(f"features of sample {int((~finite).nonzero()[0])} are not finite")
        dtype = torch.float64 if h.device.type == "cpu" else torch.float32
        key = (h.device, dtype)
        if key not in self._cache:
            self._cache = {key: (self.coef.to(h.device, dtype), self.intercept.to(h.device, dtype))}
        W, c = self._cache[key]
        out = (h.to(dtype) @ W + c).float()
        return {name: out[:, i] for i, name in enumerate(self.names)}

    def predict_array(self, h) -> np.ndarray:
        """(N, H) -> (N, D) numpy float64 (for metrics)."""
        pred = self.predict(h if isinstance(h, torch.Tensor) else torch.as_tensor(_as_matrix(h, "features")))
        return np.stack([pred[n].double().cpu().numpy() for n in self.names], axis=1)

    # -- compatibility -------------------------------------------------------------------------------
    def check_compatible(self, hidden_size: int, checkpoint: str | None = None, *, where: str = "heads",
                         strict: bool = True, settings: Mapping | None = None) -> None:
        """Raise :class:`HeadsError` if the heads were fit on another backbone: a different hidden
        size always; a different checkpoint fingerprint unless ``strict=False`` (then a warning).
        ``settings`` (``rope``, ``image_size``, ``max_length``, backbone options of the scorer) that
        differ from the ones the features were extracted with change the features: a warning."""
        for key, value in (settings or {}).items():
            fit_value = self.fingerprint.get(key)
            if fit_value is not None and value is not None and fit_value != value:
                logger.warning("%s were fit on features extracted with %s=%s but the model scores with %s=%s",
                               where, key, fit_value, key, value)
        if hidden_size != self.hidden_size:
            raise HeadsError(f"{where}: fit on features of hidden size {self.hidden_size}, but the loaded "
                             f"backbone has hidden size {hidden_size} (heads of another model?)")
        mine = self.fingerprint.get("checkpoint")
        if mine is None or checkpoint is None:
            if mine is None:
                logger.warning("%s carry no checkpoint fingerprint; cannot verify they match the backbone", where)
            return
        if mine != checkpoint:
            msg = (f"{where}: fit on features of checkpoint {mine} ({self.fingerprint.get('checkpoint_name', '?')}), "
                   f"but the loaded checkpoint is {checkpoint}; refit them with `multitap-rl fit-heads` on this "
                   "checkpoint's features (or pass strict=False to use them anyway)")
            if strict:
                raise HeadsError(msg)
            logger.warning(msg)

    # -- fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
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
        names = _check_names(names)
        if Y.shape[0] != X.shape[0]:
            raise HeadsError(f"{Y.shape[0]} target rows but {X.shape[0]} feature rows; they must match one to one")
        if np.isinf(Y).any():
            d = int(np.flatnonzero(np.isinf(Y).any(axis=0))[0])
            raise HeadsError(f"target {names[d]!r} is infinite at row {int(np.flatnonzero(np.isinf(Y[:, d]))[0])}")
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

        # 3. Training statistics.
        pred = X @ coef + intercept
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
        return cls(names, coef, intercept, fingerprint=fingerprint or {"hidden_size": X.shape[1]},
                   stats=stats, meta=info)

    # -- persistence ---------------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {
            "format": HEADS_FORMAT,
            "version": HEADS_VERSION,
            "names": list(self.names),
            "hidden_size": self.hidden_size,
            "fingerprint": self.fingerprint,
            "stats": {k: list(v) for k, v in self.stats.items()},
            **{k: v for k, v in self.meta.items() if k not in ("format", "version", "names", "hidden_size",
                                                                 "fingerprint", "stats")},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``heads.safetensors`` (``coef`` (H, D), ``intercept`` (D,), float64) and
        ``heads.json`` into ``directory`` (created), each atomically. Returns the directory."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp_w = out / f".{WEIGHTS_FILE}.tmp"
        save_file({"coef": self.coef.contiguous(), "intercept": self.intercept.contiguous()}, str(tmp_w),
                  metadata={"format": HEADS_FORMAT, "names": json.dumps(list(self.names))})
        tmp_c = out / f".{CONFIG_FILE}.tmp"
        tmp_c.write_text(json.dumps(self.to_config(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, *, trust_legacy: bool = False,
             legacy_names: Sequence[str] | None = None) -> RidgeHeads:
        """Heads from a directory written by :meth:`save` (or its ``heads.json``/``heads.safetensors``).

        A legacy scikit-learn/joblib pickle (``*.joblib``, ``*.pkl``, ...) is refused unless
        ``trust_legacy=True``: unpickling runs arbitrary code from the file. Then its ``coef_``/
        ``intercept_`` (a ``Ridge``/``RidgeCV``/``LinearRegression``, optionally after a
        ``StandardScaler`` in a ``Pipeline``) are read, named by ``legacy_names`` (default
        ``dim_0, dim_1, ...``). Convert once with :func:`convert_legacy_heads`.
        """
        p = Path(os.fspath(path)).expanduser()
        if p.suffix.lower() in LEGACY_SUFFIXES:
            return _load_legacy(p, trust_legacy=trust_legacy, names=legacy_names)
        if p.is_file() and p.name in (CONFIG_FILE, WEIGHTS_FILE):
            p = p.parent
        if not p.is_dir():
            raise HeadsError(f"heads {os.fspath(path)!r}: no such directory")
        cfg_path, w_path = p / CONFIG_FILE, p / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            legacy = sorted(f.name for f in p.iterdir() if f.suffix.lower() in LEGACY_SUFFIXES)
            hint = (f"; found pickle file(s) {legacy}: load one with trust_legacy=True only if you trust it, "
                    "and convert it with convert_legacy_heads") if legacy else ""
            raise HeadsError(f"heads {str(p)!r}: expected {CONFIG_FILE} and {WEIGHTS_FILE}{hint}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise HeadsError(f"{cfg_path}: not valid JSON ({exc})") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError) as exc:
            raise HeadsError(f"{w_path}: cannot read safetensors ({exc})") from None
        heads = cls._from_parts(cfg, tensors, str(p))
        heads.meta["path"] = str(p)
        return heads

    @classmethod
    def _from_parts(cls, cfg, tensors: dict, where: str) -> RidgeHeads:
        """Heads from a ``heads.json`` dict and the ``coef``/``intercept`` tensors, checked."""
        if not isinstance(cfg, dict) or cfg.get("format") != HEADS_FORMAT:
            fmt = cfg.get("format") if isinstance(cfg, dict) else None
            raise HeadsError(f"{where}: not a multitap-rl heads file (format {fmt!r})")
        if int(cfg.get("version", 0)) > HEADS_VERSION:
            raise HeadsError(f"{where}: written by a newer multitap-rl (version {cfg['version']})")
        if set(tensors) != {"coef", "intercept"}:
            raise HeadsError(f"{where}: expected tensors coef and intercept, found {sorted(tensors)}")
        names = cfg.get("names") or []
        if tensors["coef"].ndim != 2 or tensors["coef"].shape[1] != len(names):
            raise HeadsError(f"{where}: coef {tuple(tensors['coef'].shape)} does not match {len(names)} names in "
                             f"{CONFIG_FILE}")
        if tensors["coef"].shape[0] != cfg.get("hidden_size"):
            raise HeadsError(f"{where}: coef has {tensors['coef'].shape[0]} rows but {CONFIG_FILE} says hidden size "
                             f"{cfg.get('hidden_size')}")
        meta = {k: v for k, v in cfg.items() if k not in ("names", "hidden_size", "fingerprint", "stats")}
        return cls(names, tensors["coef"], tensors["intercept"], fingerprint=cfg.get("fingerprint"),
                   stats=cfg.get("stats"), meta=meta)

    def to_bytes(self) -> tuple[str, bytes]:
        """(``heads.json`` text, ``heads.safetensors`` bytes): what :meth:`save` writes, in memory,
        hashable and pickle-safe (no code runs on load). Inverse: :meth:`from_bytes`."""
        from safetensors.torch import save

        weights = save({"coef": self.coef.contiguous(), "intercept": self.intercept.contiguous()},
                       metadata={"format": HEADS_FORMAT, "names": json.dumps(list(self.names))})
        return json.dumps(self.to_config(), sort_keys=True), weights

    @classmethod
    def from_bytes(cls, state: tuple[str, bytes]) -> RidgeHeads:
        from safetensors import SafetensorError
        from safetensors.torch import load

        config, weights = state
        try:
            tensors = load(weights)
        except SafetensorError as exc:
            raise HeadsError(f"in-memory heads: cannot read safetensors ({exc})") from None
        return cls._from_parts(json.loads(config), tensors, "in-memory heads")


# ---------------------------------------------------------------------------------------------
# legacy pickles
# ---------------------------------------------------------------------------------------------
def _load_legacy(path: Path, *, trust_legacy: bool, names: Sequence[str] | None) -> RidgeHeads:
    if not trust_legacy:
        raise HeadsError(
            f"{path} is a pickle (scikit-learn/joblib). Loading a pickle runs arbitrary code from the file, so "
            "multitap-rl refuses it by default. If you trust its origin, pass trust_legacy=True "
            "(CLI: --trust-legacy-pickle) and convert it once to the safe format with convert_legacy_heads "
            "(`multitap-rl fit-heads --from-legacy FILE --trust-legacy-pickle --out DIR`)."
        )
    if not path.is_file():
        raise HeadsError(f"legacy heads {str(path)!r}: no such file")
    import joblib

    logger.warning("unpickling %s (trust_legacy=True): convert it to the safe format", path)
    obj = joblib.load(path)  # noqa: S301 -- explicit opt-in above
    mean = scale = None
    if hasattr(obj, "steps"):  # sklearn Pipeline: [StandardScaler?, linear model]
        steps = [s for _, s in obj.steps if s is not None and s != "passthrough"]
        if len(steps) == 2 and hasattr(steps[0], "mean_") and hasattr(steps[0], "scale_"):
            mean, scale = np.asarray(steps[0].mean_, dtype=np.float64), np.asarray(steps[0].scale_, dtype=np.float64)
            obj = steps[1]
        elif len(steps) == 1:
            obj = steps[0]
        else:
            raise HeadsError(f"{path}: unsupported pipeline {[type(s).__name__ for s in steps]}; expected "
                             "[StandardScaler, linear model] or a linear model")
    if not (hasattr(obj, "coef_") and hasattr(obj, "intercept_")):
        raise HeadsError(f"{path}: a {type(obj).__name__} has no coef_/intercept_; expected a fitted scikit-learn "
                         "linear model such as Ridge")
    coef = np.atleast_2d(np.asarray(obj.coef_, dtype=np.float64))  # sklearn: (D, H) (or (H,) for one target)
    intercept = np.atleast_1d(np.asarray(obj.intercept_, dtype=np.float64))
    if intercept.size == 1 and coef.shape[0] != 1:
        intercept = np.repeat(intercept, coef.shape[0])
    coef = coef.T  # (H, D)
    if mean is not None:
        scale = np.where(scale > 0, scale, 1.0)
        intercept = intercept - (mean / scale) @ coef
        coef = coef / scale[:, None]
    d = coef.shape[1]
    names = list(names) if names is not None else [f"dim_{i}" for i in range(d)]
    if len(names) != d:
        raise HeadsError(f"{path}: the model predicts {d} dimensions but {len(names)} names were given: {names}")
    alpha = getattr(obj, "alpha_", getattr(obj, "alpha", None))
    alpha_list = np.atleast_1d(np.asarray(alpha, dtype=np.float64)).tolist() if alpha is not None else []
    alphas = {n: float(alpha_list[i if len(alpha_list) == d else 0]) for i, n in enumerate(names)} if alpha_list else {}
    return RidgeHeads(names, coef, intercept, fingerprint={"hidden_size": coef.shape[0], "checkpoint": None},
                      meta={"alphas": alphas, "legacy_source": str(path), "legacy_type": type(obj).__name__})


def convert_legacy_heads(src: str | os.PathLike, dst: str | os.PathLike, *, names: Sequence[str] | None = None,
                         trust_legacy: bool = False, fingerprint: Mapping | None = None,
                         stats: Mapping[str, Sequence[float]] | None = None) -> RidgeHeads:
    """Read a legacy pickle (only with ``trust_legacy=True``) and save it in the safe format at ``dst``.

    ``fingerprint``: the backbone the pickle was fit for (e.g. ``{"checkpoint": model.info["fingerprint"]}``),
    so later loads can verify it; ``stats``: prediction ``(mean, std)`` per dimension if known.
    """
    heads = _load_legacy(Path(os.fspath(src)).expanduser(), trust_legacy=trust_legacy, names=names)
    if fingerprint:
        fp = dict(heads.fingerprint)
        fp.update(fingerprint)
        heads = RidgeHeads(heads.names, heads.coef, heads.intercept, fingerprint=fp, stats=stats or heads.stats,
                           meta=heads.meta)
    elif stats:
        heads.stats = {k: (float(v[0]), float(v[1])) for k, v in stats.items()}
    heads.save(dst)
    return heads
