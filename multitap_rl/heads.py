"""Stage-2 ridge heads: named dimensions predicted linearly from the frozen hidden state.

MULTI-TAP's second stage fits ridge regression on the last-position hidden state ``h`` (the same
feature the stage-1 head reads) to predict human-interpretable dimensions. :class:`RidgeHeads` are
the fitted heads: ``predict(h) -> {name: (N,)}``, training statistics (``stats``, for
``RewardCombiner(normalize="fixed")``), a fingerprint of the backbone whose features they were fit
on, and ``save``/``load`` as safetensors (coefficients) + JSON (names, alphas, target ranges,
statistics, fingerprint). No pickle, unless a legacy scikit-learn/joblib file is loaded with the
explicit ``trust_legacy=True`` opt-in (:meth:`RidgeHeads.load`, :func:`convert_legacy_heads`).

Fitting them (ridge with leave-one-out alpha) is training: :mod:`multitap_rl.training.ridge`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .dimensions import OVERALL, check_dimension_name
from .errors import HeadsError

__all__ = ["HEADS_FORMAT", "HeadsError", "RidgeHeads", "as_real", "convert_legacy_heads", "normalization_problem",
           "real_pair"]

logger = logging.getLogger(__name__)

HEADS_FORMAT = "multitap-rl/ridge-heads"
HEADS_VERSION = 1
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads.json"
LEGACY_SUFFIXES = (".joblib", ".pkl", ".pickle", ".sav")


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------
def check_head_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple if they are valid, distinct stage-2 dimension names (not ``overall``)."""
    if isinstance(names, str):
        raise HeadsError(f"names must be a list of dimension names, got the string {names!r}")
    names = tuple(names)
    if not names:
        raise HeadsError("heads need at least one dimension name")
    for n in names:
        check_dimension_name(n, error=HeadsError)
        if n == OVERALL:
            raise HeadsError(f"dimension name {n!r} is reserved for the stage-1 head")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise HeadsError(f"dimension names repeat: {dup}")
    return names


# Scores and normalised rewards are float32 tensors: a statistic must survive that arithmetic.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def normalization_problem(mean: float, std: float, span: Sequence[float] | None = None) -> str | None:
    """Why ``(x - mean) / std`` (computed in float32, as :class:`~multitap_rl.combiner.RewardCombiner`
    does) cannot be trusted to be finite, or None if it can.

    ``mean`` must be a finite float32 and ``std`` a *normal* float32 (``FLOAT32_TINY <= std <=
    FLOAT32_MAX``): a smaller std is rounded towards 0 in float32 and a deviation of 1 would then
    normalise to more than ``1 / FLOAT32_TINY`` ~ 8.5e37, i.e. to inf for any score of ordinary size.
    ``span`` (the dimension's range ``(lo, hi)``, when known): both ends must normalise to finite
    float32 values (computed in float64)."""
    if not (math.isfinite(mean) and math.isfinite(std)):
        return "the mean and the std must be finite"
    if abs(mean) > FLOAT32_MAX:
        return f"the mean is outside the float32 range (|mean| <= {FLOAT32_MAX:.4g}) the scores are in"
    if not FLOAT32_TINY <= std <= FLOAT32_MAX:
        return (f"the std must be a normal float32, between {FLOAT32_TINY:.4g} and {FLOAT32_MAX:.4g} (a smaller one "
                "turns ordinary scores into inf)")
    if span is not None:
        worst = max(abs(float(span[0]) - mean), abs(float(span[1]) - mean)) / std
        if not worst <= FLOAT32_MAX:
            return (f"the dimension's range [{float(span[0]):g}, {float(span[1]):g}] normalises to {worst:.4g}, "
                    "beyond float32")
    return None


def as_real(value) -> float | None:
    """``value`` as a float if it is a real number -- any ``numbers.Real`` (Python, numpy) or a
    one-element real torch tensor / numpy array -- else None. Booleans are not numbers here.
    NaN and inf are returned as they are: callers decide whether they are allowed."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0 and value.dtype not in (torch.bool, np.bool_) \
            and not (value.dtype.is_complex if isinstance(value, torch.Tensor) else np.iscomplexobj(value)):
        return float(value.item())
    return None


def real_pair(value) -> tuple[float, float] | None:
    """Two real numbers (a list, tuple or 1-D array of two, see :func:`as_real`) as floats, else None."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        value = list(value)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 2:
        return None
    pair = [as_real(x) for x in value]
    return None if None in pair else (pair[0], pair[1])


def _pair(value, what: str) -> tuple[float, float]:
    """``(mean, std)`` as floats from two real numbers, else a ``HeadsError``."""
    pair = real_pair(value)
    if pair is None:
        raise HeadsError(f"{what} must be [mean, std] (two numbers), got {value!r}")
    return pair


def _span(ranges, name: str) -> tuple[float, float] | None:
    """The target range of ``name`` from heads metadata ``target_ranges`` (``overall`` is a
    sigmoid: [0, 1]); None when it is absent or not two finite numbers."""
    if name == OVERALL:
        return (0.0, 1.0)
    r = ranges.get(name) if isinstance(ranges, Mapping) else None
    try:
        lo, hi = (float(x) for x in r)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _check_stats(stats, ranges: Mapping | None = None) -> dict[str, tuple[float, float]]:
    """``{dim: (mean, std)}`` whose normalisation ``(x - mean) / std`` is finite in float32 for
    scores in the dimension's range (``ranges``: ``{dim: [lo, hi]}``, e.g. the heads' target
    ranges), see :func:`normalization_problem`; else a ``HeadsError`` naming the dimension."""
    if stats is None:
        return {}
    if not isinstance(stats, Mapping):
        raise HeadsError(f"stats must map dimension -> [mean, std], got {type(stats).__name__}")
    out = {}
    for k, v in stats.items():
        mean, std = _pair(v, f"stats[{k!r}]")
        problem = normalization_problem(mean, std, _span(ranges or {}, str(k)))
        if problem:
            raise HeadsError(f"stats[{k!r}] = ({mean}, {std}): the mean must be finite and the std finite and > 0, "
                             f"keeping (x - mean) / std finite in float32: {problem}")
        out[str(k)] = (mean, std)
    return out


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
        self.names = check_head_names(names)
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
        if isinstance(fp["hidden_size"], bool) or not isinstance(fp["hidden_size"], int) \
                or fp["hidden_size"] != self.hidden_size:
            raise HeadsError(f"fingerprint says hidden size {fp['hidden_size']} but coef has {self.hidden_size} rows")
        self.fingerprint = fp
        self.meta = dict(meta or {})
        self.stats = _check_stats(stats, self.meta.get("target_ranges"))
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
                   "checkpoint's features")
            if strict:
                raise HeadsError(msg)
            logger.warning(msg)

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
        """Heads from a ``heads.json`` dict and the ``coef``/``intercept`` tensors, every field checked:
        a bad field or tensor is a ``HeadsError`` naming it, never a raw ``int()``/``TypeError``."""
        if not isinstance(cfg, dict) or cfg.get("format") != HEADS_FORMAT:
            fmt = cfg.get("format") if isinstance(cfg, dict) else None
            raise HeadsError(f"{where}: not a multitap-rl heads file (format {fmt!r})")
        version = cfg.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise HeadsError(f"{where}: {CONFIG_FILE} field 'version' must be an integer, got {version!r}")
        if version > HEADS_VERSION:
            raise HeadsError(f"{where}: written by a newer multitap-rl (version {version})")
        if set(tensors) != {"coef", "intercept"}:
            raise HeadsError(f"{where}: expected tensors coef and intercept, found {sorted(tensors)}")
        for key, t in tensors.items():
            if not t.dtype.is_floating_point:
                raise HeadsError(f"{where}: tensor {key!r} has dtype {t.dtype}; heads are floating point")
            if not bool(torch.isfinite(t).all()):
                raise HeadsError(f"{where}: tensor {key!r} holds NaN or infinite values")
        names = cfg.get("names")
        if not isinstance(names, list):
            raise HeadsError(f"{where}: {CONFIG_FILE} field 'names' must be a list of dimension names, got {names!r}")
        hidden = cfg.get("hidden_size")
        if isinstance(hidden, bool) or not isinstance(hidden, int):
            raise HeadsError(f"{where}: {CONFIG_FILE} field 'hidden_size' must be an integer, got {hidden!r}")
        for field in ("fingerprint", "stats"):
            if cfg.get(field) is not None and not isinstance(cfg[field], dict):
                raise HeadsError(f"{where}: {CONFIG_FILE} field {field!r} must be an object, got {cfg[field]!r}")
        coef = tensors["coef"]
        if coef.ndim != 2 or coef.shape[1] != len(names):
            raise HeadsError(f"{where}: coef {tuple(coef.shape)} does not match {len(names)} names in {CONFIG_FILE}")
        if coef.shape[0] != hidden:
            raise HeadsError(f"{where}: coef has {coef.shape[0]} rows but {CONFIG_FILE} says hidden size {hidden}")
        meta = {k: v for k, v in cfg.items() if k not in ("names", "hidden_size", "fingerprint", "stats")}
        try:
            return cls(names, coef, tensors["intercept"], fingerprint=cfg.get("fingerprint"), stats=cfg.get("stats"),
                       meta=meta)
        except HeadsError as exc:
            raise HeadsError(f"{where}: {exc}") from None

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
        try:
            cfg = json.loads(config)
        except (TypeError, json.JSONDecodeError) as exc:
            raise HeadsError(f"in-memory heads: not valid JSON ({exc})") from None
        return cls._from_parts(cfg, tensors, "in-memory heads")


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
        heads.stats = _check_stats(stats, heads.meta.get("target_ranges"))
    heads.save(dst)
    return heads
