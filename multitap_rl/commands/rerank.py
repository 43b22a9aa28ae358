"""``multitap-rl rerank``: rank candidate captions (or responses) for an image, best first."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, DataError
from ._common import add_model_arguments, emit


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--candidates", required=True, help="text file, one candidate per line (blank lines skipped)")
    p.add_argument("--question", default=None, help="instruction task: the question the candidates answer")
    p.add_argument("--weights", default=None, help='e.g. "overall=1,safety=2" or a preset name (default overall=1)')
    p.add_argument("--normalize", default="none", choices=["none", "fixed"])
    p.add_argument("--gate", action="append", default=[], help='e.g. "safety<0.5:cap=0" (repeatable)')
    p.add_argument("--top-k", type=int, default=None, help="print only the best K")
    p.add_argument("--json", action="store_true", help="one JSON object per candidate instead of a table")


def run(args) -> int:
    from reward_fns.best_of_n import rerank

    from ._common import model_spec

    path = Path(args.candidates)
    if not path.is_file():
        raise ConfigError(f"candidates file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None
    candidates = [line.strip() for line in text.splitlines() if line.strip()]
    if not candidates:
        raise DataError(f"{path}: no candidates")
    if not Path(args.image).is_file():
        raise ConfigError(f"image file not found: {args.image}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k must be >= 1")
    # the weights are checked against the heads' dimensions before the model loads
    ranked = rerank(model_spec(args), [args.image], [candidates], weights=args.weights,
                    questions=None if args.question is None else [args.question],
                    normalize=args.normalize, gates=args.gate)[0]
    for rank, cand in enumerate(ranked[: args.top_k], start=1):
        if args.json:
            emit(json.dumps({"rank": rank, "index": cand.index, "text": cand.text, "reward": cand.reward,
                              **cand.dims}))
        else:
            dims = "  ".join(f"{k}={v:.4f}" for k, v in cand.dims.items())
            emit(f"{rank:>3}. {cand.reward:+.4f}  {cand.text}   [{dims}]")
    return 0
