"""``multitap-rl precision``: how far bf16 (or TF32) scores are from fp32 scores on your own samples.

Input: JSONL rows ``{"image": path, "text": str, "question"?: str}`` (relative image paths next to
the file). Consecutive rows form the groups that are ranked together (``--group-size G``: rows
``[g*G, (g+1)*G)``, e.g. one image's G captions, as GRPO scores one prompt's G completions), so
the number of rows must be a multiple of G. The model is loaded once per precision, one at a time.

Output (stdout): a table per candidate precision and dimension -- mean/max |Δ| of the scores, the
reference's mean spread inside a group, the fraction of groups ranked exactly the same, top-1
agreement, pair agreement, and the mean |Δ| of GRPO's group advantages; ``--json``: the same as one
JSON object.
"""

from __future__ import annotations

import json
import os

from ..errors import ConfigError, DataError, SampleError
from ._common import add_model_arguments, emit


def add_arguments(p) -> None:
    add_model_arguments(p, dtype=False)
    p.add_argument("--input", required=True, help='JSONL rows {"image": path, "text": str, "question"?: str}')
    p.add_argument("--group-size", type=int, required=True,
                   help="rows ranked together (consecutive; e.g. GRPO's num_generations)")
    p.add_argument("--reference", default="fp32", help="reference precision (default fp32)")
    p.add_argument("--candidates", default="bf16",
                   help="comma-separated precisions to compare: bf16, fp16, tf32 (fp32 weights, TF32 matmuls on CUDA; "
                        "identical to fp32 on CPU) (default bf16)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per model call (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _samples(path: str):
    """(images, texts, questions or None, each row's input line) of the ``--input`` file; a bad row
    is a ``SampleError`` naming its line."""
    from pathlib import Path

    from ..data.rows import read_json_rows, resolve_image

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--input {path}: no such file")
    rows, lines = read_json_rows(p)
    if not rows:
        raise DataError(f"{p}: no rows")
    images, texts, questions = [], [], []
    for row, line in zip(rows, lines):
        for key in ("image", "text"):
            if key not in row:
                raise SampleError(line, key, f"missing field {key!r}", unit="line", source=str(p))
        image = resolve_image(row["image"], p.resolve().parent)
        if not isinstance(image, (str, os.PathLike)) or not os.path.isfile(image):
            raise SampleError(line, "image", f"file not found: {image}", unit="line", source=str(p))
        if not isinstance(row["text"], str):
            raise SampleError(line, "text", f"expected str, got {type(row['text']).__name__}", unit="line",
                              source=str(p))
        q = row.get("question")
        if q is not None and not isinstance(q, str):
            raise SampleError(line, "question", f"expected str or null, got {type(q).__name__}", unit="line",
                              source=str(p))
        images.append(image)
        texts.append(row["text"])
        questions.append(q)
    has_q = [q is not None for q in questions]
    if any(has_q) and not all(has_q):
        raise DataError(f"{p}: some rows have a question and some do not; the precision check scores one task at "
                        "a time")
    return images, texts, (questions if all(has_q) else None), lines


def run(args) -> int:
    from ..precision import PRECISIONS, compare_precision, format_reports

    # 1. Cheap checks before any model loads.
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for name in [args.reference, *candidates]:
        if name not in PRECISIONS:
            raise ConfigError(f"unknown precision {name!r}; use one of {list(PRECISIONS)}")
    if not candidates:
        raise ConfigError("--candidates is empty")
    if args.group_size < 2:
        raise ConfigError("--group-size must be >= 2")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    images, texts, questions, lines = _samples(args.input)
    if len(texts) % args.group_size:
        raise DataError(f"{args.input}: {len(texts)} rows do not form groups of {args.group_size}; give a multiple of "
                        f"{args.group_size} rows, each group's rows consecutive")
    # 2. Score in each precision and compare; a bad sample is named by its input line.
    try:
        reports = compare_precision(
            args.checkpoint, images, texts, questions, group_size=args.group_size, reference=args.reference,
            candidates=candidates, base_model=args.base_model, heads=args.heads, device=args.device, rope=args.rope,
            image_size=args.image_size, max_length=args.max_length, batch_size=args.batch_size,
        )
    except SampleError as exc:
        if exc.index is None or exc.unit is not None or not 0 <= exc.index < len(lines):
            raise
        raise exc.at(lines[exc.index], unit="line", source=args.input) from exc
    if args.json:
        emit(json.dumps({"reports": [r.to_dict() for r in reports]}, indent=2))
    else:
        emit(format_reports(reports))
    return 0
