"""Numerical precision a user can see: how far bf16 (or TF32) scores are from fp32 scores, and
whether they rank the samples of a group (a GRPO group: one prompt's G completions) the same way.

* :func:`tf32_matmuls` -- TF32 matmuls/convolutions for the duration of a block (used around a
  ``dtype="tf32"`` model's own forward on CUDA; the user's setting is restored exactly after).
* :func:`ranking_agreement` -- pure function over two (N,) score vectors in groups of G.
* :func:`compare_precision` -- load the model once per precision, score the user's own samples,
  and report, per dimension, mean/max ``|Δ|`` and within-group ranking agreement
  (:class:`PrecisionReport`). The ``multitap-rl precision`` command prints it.

Why it matters (measured on an H100 with random weights at real Qwen2-VL widths, README "Many
GPUs"): bf16 scores differ from fp32 by a mean of 0.006-0.011 while the spread inside a GRPO group
of 4 is ~0.024-0.061, so bf16 reorders about half of the groups.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .errors import ConfigError, DataError, SampleError
from .tf32 import tf32_matmuls

__all__ = ["PRECISIONS", "DimensionAgreement", "PrecisionReport", "compare_precision", "format_reports",
           "ranking_agreement", "tf32_matmuls"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------
# agreement of two score vectors
# ---------------------------------------------------------------------------------------------
@dataclass
class DimensionAgreement:
    """One dimension, candidate vs reference precision, over N samples in N / G groups of G.

    ``mean_abs_diff``/``max_abs_diff``: of the scores. ``group_spread``: mean over groups of the
    reference's max - min inside the group (what a difference must stay well below not to reorder
    it). ``same_ranking``: fraction of groups whose members the candidate orders exactly as the
    reference (ties only where the reference ties). ``top1``: fraction of groups where the
    candidate's best member is a best member of the reference's. ``pair_agreement``: fraction of
    within-group pairs ordered the same. ``advantage_mean_abs_diff``: mean |Δ| of GRPO's group
    advantages ``(r - mean) / (std + 1e-4)`` (TRL's formula, unbiased std)."""

    mean_abs_diff: float
    max_abs_diff: float
    group_spread: float
    same_ranking: float
    top1: float
    pair_agreement: float
    advantage_mean_abs_diff: float


def ranking_agreement(reference: torch.Tensor, candidate: torch.Tensor, group_size: int) -> DimensionAgreement:
    """Compare two (N,) score vectors; samples ``[g*G, (g+1)*G)`` form group ``g``."""
    ref = torch.as_tensor(reference, dtype=torch.float64).reshape(-1)
    cand = torch.as_tensor(candidate, dtype=torch.float64).reshape(-1)
    if ref.shape != cand.shape:
        raise DataError(f"reference has {ref.numel()} scores, candidate {cand.numel()}")
    _check_groups(ref.numel(), group_size)
    if not (torch.isfinite(ref).all() and torch.isfinite(cand).all()):
        raise DataError("scores must be finite to compare precisions")
    r, c = ref.reshape(-1, group_size), cand.reshape(-1, group_size)
    sr = torch.sign(r[:, :, None] - r[:, None, :])  # (groups, G, G) pairwise order
    sc = torch.sign(c[:, :, None] - c[:, None, :])
    iu = torch.triu_indices(group_size, group_size, offset=1)
    agree = (sr == sc)[:, iu[0], iu[1]]  # (groups, G(G-1)/2)
    best_c = c.argmax(dim=1)
    top1 = (r.gather(1, best_c[:, None]).squeeze(1) == r.max(dim=1).values)

    def advantages(x):
        return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + 1e-4)

    diff = (ref - cand).abs()
    return DimensionAgreement(
        mean_abs_diff=float(diff.mean()),
        max_abs_diff=float(diff.max()),
        group_spread=float((r.max(dim=1).values - r.min(dim=1).values).mean()),
        same_ranking=float(agree.all(dim=1).double().mean()),
        top1=float(top1.double().mean()),
        pair_agreement=float(agree.double().mean()),
        advantage_mean_abs_diff=float((advantages(r) - advantages(c)).abs().mean()),
    )


def _check_groups(n: int, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"group_size must be an int >= 2 (the samples ranked together), got {group_size!r}")
    if n == 0 or n % group_size:
        raise DataError(f"{n} samples do not form groups of {group_size}: give a multiple of {group_size} samples, "
                        f"each group's members consecutive (e.g. one image's {group_size} captions)")


# ---------------------------------------------------------------------------------------------
# measuring on the user's samples
# ---------------------------------------------------------------------------------------------
@dataclass
class PrecisionReport:
    """``candidate`` vs ``reference`` precision on N samples in groups of ``group_size``, per
    dimension (``overall`` and any stage-2 heads)."""

    reference: str
    candidate: str
    device: str
    n: int
    group_size: int
    dims: dict[str, DimensionAgreement] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "device": self.device, "n": self.n,
                "group_size": self.group_size, "dims": {k: asdict(v) for k, v in self.dims.items()}}


def _precision_name(p) -> str:
    if p not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {p!r}")
    return p


def _scores(load, precision: str, images, texts, questions, batch_size: int) -> tuple[str, dict[str, torch.Tensor]]:
    """Load the model in ``precision``, score every sample, free the model: (device, {dim: (N,) float64}).
    A bad sample is a ``SampleError`` whose index is its position among all N samples."""
    model = load(precision)
    try:
        parts = []
        for s in range(0, len(texts), batch_size):
            q = None if questions is None else questions[s:s + batch_size]
            try:
                parts.append(model.score(images[s:s + batch_size], texts[s:s + batch_size], q))
            except SampleError as exc:
                if exc.index is None or exc.unit is not None:
                    raise
                raise exc.at(s + exc.index, detail=exc.detail) from exc  # the batch's index -> the caller's
        dims = {name: torch.cat([p.scores[name] for p in parts]).double() for name in parts[0].scores}
        device = str(model.device)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return device, dims


def compare_precision(
    checkpoint,
    images: Sequence,
    texts: Sequence[str],
    questions: Sequence[str] | None = None,
    *,
    group_size: int = 4,
    reference: str = "fp32",
    candidates: Sequence[str] = ("bf16",),
    base_model=None,
    heads=None,
    device=None,
    batch_size: int = 32,
    **load_kwargs,
) -> list[PrecisionReport]:
    """How far each ``candidates`` precision's scores are from ``reference``'s on these samples.

    Args:
        checkpoint, base_model, heads, device, **load_kwargs: as ``MultiTapModel.from_pretrained``
            (the model is loaded once per precision, one at a time, and freed before the next).
        images, texts, questions: N samples, as for ``MultiTapModel.score``; groups are
            consecutive: samples ``[g*G, (g+1)*G)`` are ranked together (e.g. an image's G
            captions, as GRPO scores one prompt's G completions).
        group_size: G >= 2; N must be a multiple of G.
        reference, candidates: among "fp32", "tf32" (fp32 weights, TF32 matmuls on CUDA; on CPU
            identical to fp32), "bf16", "fp16".
        batch_size: samples per ``score`` call.

    Returns one :class:`PrecisionReport` per candidate. A bad sample raises a ``SampleError`` whose
    ``index`` is its position in ``images``/``texts`` (whatever ``batch_size`` is).
    """
    from .model import MultiTapModel

    reference = _precision_name(reference)
    candidates = [_precision_name(c) for c in ([candidates] if isinstance(candidates, str) else candidates)]
    if not candidates:
        raise ConfigError("give at least one candidate precision")
    if len(images) != len(texts):
        raise DataError(f"got {len(images)} images but {len(texts)} texts; pass one image per text")
    if questions is not None and len(questions) != len(texts):
        raise DataError(f"got {len(questions)} questions for {len(texts)} texts")
    _check_groups(len(texts), group_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")

    def load(precision):
        return MultiTapModel.from_pretrained(checkpoint, base_model=base_model, heads=heads, device=device,
                                             dtype=precision, **load_kwargs)

    device, ref = _scores(load, reference, images, texts, questions, batch_size)
    reports = []
    for cand_name in candidates:
        _, cand = _scores(load, cand_name, images, texts, questions, batch_size)
        dims = {name: ranking_agreement(ref[name], cand[name], group_size) for name in ref}
        reports.append(PrecisionReport(reference=reference, candidate=cand_name, device=device, n=len(texts),
                                       group_size=group_size, dims=dims))
    return reports


def format_reports(reports: Sequence[PrecisionReport]) -> str:
    """A plain-text table, one row per (candidate, dimension)."""
    head = ("candidate", "dim", "mean|Δ|", "max|Δ|", "group spread", "same ranking", "top-1", "pairs", "adv |Δ|")
    rows = [head]
    for rep in reports:
        for name, a in rep.dims.items():
            rows.append((f"{rep.candidate} vs {rep.reference}", name, f"{a.mean_abs_diff:.2e}", f"{a.max_abs_diff:.2e}",
                         f"{a.group_spread:.2e}", f"{a.same_ranking:.1%}", f"{a.top1:.1%}", f"{a.pair_agreement:.1%}",
                         f"{a.advantage_mean_abs_diff:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if reports:
        rep = reports[0]
        lines.append(f"({rep.n} samples in groups of {rep.group_size}, on {rep.device})")
    return "\n".join(lines)
