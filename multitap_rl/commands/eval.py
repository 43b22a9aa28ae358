"""``multitap-rl eval``: per-dimension agreement of heads (and ``overall``) with targets."""

from __future__ import annotations

import json
from pathlib import Path

from ._common import emit


def add_arguments(p) -> None:
    p.add_argument("--features", required=True, help="feature store directory from `multitap-rl extract`")
    p.add_argument("--heads", default=None, help="heads directory (default: evaluate `overall` only)")
    p.add_argument("--targets", default=None,
                   help="JSONL/JSON/CSV of targets (default: the targets stored at extraction); a column named "
                        "'overall' is compared with the stage-1 score")
    p.add_argument("--dims", default=None, help="comma-separated dimensions to report (default: all in common)")
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy within this tolerance (reference: 0.5)")
    p.add_argument("--pairs", default="auto", choices=["auto", "rows", "all"],
                   help="pairs for pairwise accuracy: within a data row, all pairs, or auto (rows if rows hold "
                        "several samples)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON here")
    p.add_argument("--trust-legacy-pickle", action="store_true",
                   help="allow --heads to be a legacy pickle (runs code from the file: only trusted files)")


def run(args) -> int:
    from ..heads import RidgeHeads
    from ..metrics import format_report
    from ..training.stage2 import evaluate_heads

    heads = RidgeHeads.load(args.heads, trust_legacy=args.trust_legacy_pickle) if args.heads else None
    dims = None if args.dims is None else [d.strip() for d in args.dims.split(",") if d.strip()]
    report = evaluate_heads(heads, args.features, args.targets, dims=dims, tol=args.tolerance, pairs=args.pairs)
    emit(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
