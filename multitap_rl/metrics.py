"""Agreement between predicted scores and human judgements (pure functions on 1-D arrays).

* :func:`kendall_tau` -- Kendall's tau-b or tau-c (Stuart), as used for the caption benchmarks.
* :func:`pairwise_accuracy` -- fraction of human-ordered pairs the scores order the same way,
  counting ties the way the reference's ``cal_acc`` does (human ties skipped, score ties wrong).
* :func:`preference_accuracy` -- chosen vs rejected: fraction with ``chosen > rejected``.
* :func:`tolerance_accuracy` -- fraction of predictions within ``tol`` of the target (the
  reference's per-dimension accuracy uses ``|pred - target| <= 0.5``).
* :func:`mse`, :func:`r2_score`.
* :func:`dimension_report` / :func:`format_report` -- all of the above per dimension, as a table.

Inputs may be lists, numpy arrays or torch tensors; every function validates lengths and
finiteness and raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "dimension_report",
    "format_report",
    "kendall_tau",
    "mse",
    "pairwise_accuracy",
    "preference_accuracy",
    "r2_score",
    "tolerance_accuracy",
]


def _vector(x, name: str, *, allow_nan: bool = False) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(x).__name__}") from None
    if arr.ndim != 1:
        arr = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not allow_nan and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} is not finite at index {bad} ({arr[bad]})")
    return arr


def _pair(pred, target, pred_name: str = "pred", target_name: str = "target") -> tuple[np.ndarray, np.ndarray]:
    p, t = _vector(pred, pred_name), _vector(target, target_name)
    if p.shape != t.shape:
        raise ValueError(f"{pred_name} has {p.size} values but {target_name} has {t.size}")
    if p.size == 0:
        raise ValueError(f"{pred_name} and {target_name} are empty")
    return p, t


def mse(pred, target) -> float:
    """Mean squared error."""
    p, t = _pair(pred, target)
    return float(np.mean((p - t) ** 2))


def r2_score(pred, target) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (``nan`` if the target is constant)."""
    p, t = _pair(pred, target)
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((t - p) ** 2)) / ss_tot


def tolerance_accuracy(pred, target, tol: float = 0.5) -> float:
    """Fraction of samples with ``|pred - target| <= tol`` (reference: tol 0.5, reported in %)."""
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    p, t = _pair(pred, target)
    return float(np.mean(np.abs(p - t) <= tol))


def _signs(v: np.ndarray, rows: slice) -> np.ndarray:
    """sign(v[j] - v[i]) for i in rows, all j: (len(rows), n) int8."""
    return np.sign(v[None, :] - v[rows, None]).astype(np.int8)


def _pair_counts(x: np.ndarray, y: np.ndarray, block: int = 2048) -> tuple[int, int, int, int]:
    """(concordant, discordant, pairs tied in x, pairs tied in y) over all i < j, exactly."""
    n = x.size
    con = dis = tx = ty = 0
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        sx, sy = _signs(x, rows), _signs(y, rows)
        upper = np.arange(n)[None, :] > np.arange(rows.start, rows.stop)[:, None]  # j > i only
        prod = sx.astype(np.int16) * sy
        con += int(np.count_nonzero((prod > 0) & upper))
        dis += int(np.count_nonzero((prod < 0) & upper))
        tx += int(np.count_nonzero((sx == 0) & upper))
        ty += int(np.count_nonzero((sy == 0) & upper))
    return con, dis, tx, ty


def kendall_tau(pred, target, variant: str = "b") -> float:
    """Kendall's rank correlation between predictions and human scores.

    ``variant="b"``: ``(C - D) / sqrt((n0 - n1) (n0 - n2))`` with ``n0 = n(n-1)/2`` and ``n1``,
    ``n2`` the pairs tied in each variable. ``variant="c"`` (Stuart's tau-c):
    ``2 (C - D) / (n^2 (m - 1) / m)`` with ``m`` the smaller number of distinct values. Both match
    ``scipy.stats.kendalltau``; ``nan`` when undefined (a constant input). Exact, O(n^2) time in
    blocks (fine for the benchmark sizes, tens of thousands of samples).
    """
    if variant not in ("b", "c"):
        raise ValueError(f"variant must be 'b' or 'c', got {variant!r}")
    x, y = _pair(pred, target)
    n = x.size
    if n < 2:
        return float("nan")
    con, dis, tx, ty = _pair_counts(x, y)
    if variant == "b":
        n0 = n * (n - 1) // 2
        denom = math.sqrt(float(n0 - tx) * float(n0 - ty))
        return float("nan") if denom == 0 else (con - dis) / denom
    m = min(np.unique(x).size, np.unique(y).size)
    if m < 2:
        return float("nan")
    return 2.0 * (con - dis) / (n * n * (m - 1) / m)


def pairwise_accuracy(pred, target, groups: Sequence | None = None, *, lower_is_better: bool = False) -> float:
    """Fraction of pairs, ordered by humans, that ``pred`` orders the same way.

    Pairs are all ``i < j`` within each group (``groups``: one label per sample, e.g. the prompt
    id; ``None`` = one group). As the reference's ``cal_acc``: pairs the humans tie are skipped;
    pairs the predictions tie count as wrong. ``lower_is_better=True`` for targets that are ranks
    (1 = best), as ImageReward's ``ranking``. ``nan`` when no pair has a human order.
    """
    p, t = _pair(pred, target, "pred", "target")
    if lower_is_better:
        t = -t
    if groups is None:
        labels = np.zeros(p.size, dtype=np.int64)
    else:
        if isinstance(groups, (str, bytes)) or len(groups) != p.size:
            raise ValueError(f"groups must give one label per sample ({p.size}), got "
                             f"{'a string' if isinstance(groups, (str, bytes)) else len(groups)}")
        _, labels = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    correct = total = 0
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        if idx.size < 2:
            continue
        con, _, _, tied_target = _pair_counts(p[idx], t[idx])
        total += idx.size * (idx.size - 1) // 2 - tied_target  # pairs the humans order
        correct += con  # ordered the same way by both (prediction ties are never concordant)
    return float("nan") if total == 0 else correct / total


def preference_accuracy(chosen, rejected) -> float:
    """Fraction of pairs with ``chosen > rejected`` (a tie counts as wrong, as in the reference)."""
    c, r = _pair(chosen, rejected, "chosen", "rejected")
    return float(np.mean(c > r))


def dimension_report(
    pred: Mapping[str, Sequence], target: Mapping[str, Sequence], *, tol: float = 0.5,
    groups: Sequence | None = None,
) -> dict[str, dict[str, float]]:
    """Per dimension present in both ``pred`` and ``target``: ``n``, ``mse``, ``r2``,
    ``acc@tol``, ``tau_b``, ``tau_c``, ``pairwise_acc``. Samples whose target is NaN (not rated)
    are left out of that dimension only."""
    common = [k for k in pred if k in target]
    if not common:
        raise ValueError(f"no dimension in common: predictions have {list(pred)}, targets have {list(target)}")
    report = {}
    for name in common:
        p = _vector(pred[name], f"pred[{name!r}]")
        t = _vector(target[name], f"target[{name!r}]", allow_nan=True)
        if p.shape != t.shape:
            raise ValueError(f"dimension {name!r}: {p.size} predictions but {t.size} targets")
        keep = np.isfinite(t)
        if not keep.any():
            raise ValueError(f"dimension {name!r}: every target is NaN")
        p, t = p[keep], t[keep]
        g = None if groups is None else [x for x, k in zip(groups, keep) if k]
        report[name] = {
            "n": int(keep.sum()),
            "mse": mse(p, t),
            "r2": r2_score(p, t),
            f"acc@{tol:g}": tolerance_accuracy(p, t, tol),
            "tau_b": kendall_tau(p, t, "b"),
            "tau_c": kendall_tau(p, t, "c"),
            "pairwise_acc": pairwise_accuracy(p, t, g),
        }
    return report


def format_report(report: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per dimension, one column per metric, plus the mean row."""
    if not report:
        return "(no dimensions)"
    metrics = list(next(iter(report.values())))
    width = max(9, *(len(k) for k in report))
    head = f"{'dimension':<{width}}" + "".join(f"{m:>14}" for m in metrics)
    lines = [head, "-" * len(head)]

    def fmt(v) -> str:
        if isinstance(v, int):
            return f"{v:>14d}"
        return f"{v:>14.4f}" if math.isfinite(v) else f"{'nan':>14}"

    for name, row in report.items():
        lines.append(f"{name:<{width}}" + "".join(fmt(row[m]) for m in metrics))
    if len(report) > 1:
        means = []
        for m in metrics:
            vals = [row[m] for row in report.values() if not (isinstance(row[m], float) and math.isnan(row[m]))]
            if m == "n":
                means.append(f"{'':>14}")
            else:
                means.append(fmt(float(np.mean(vals))) if vals else f"{'nan':>14}")
        lines.append(f"{'mean':<{width}}" + "".join(means))
    return "\n".join(lines)
