"""``multitap-rl score``: score image-text pairs; one JSON object per input row, in order."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from ._common import add_model_arguments, load_model, read_jsonl, resolve_path


def add_arguments(p) -> None:
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image file (with --text)")
    src.add_argument("--input", help='JSONL rows {"image": path, "text": str, "question"?: str}')
    p.add_argument("--text", help="the caption or response to score (with --image)")
    p.add_argument("--question", default=None, help="instruction-task question (with --image)")
    p.add_argument("--output", default=None, help="write JSONL here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per model call (default 32)")


def _rows(args) -> list[dict]:
    if args.image is not None:
        if not args.text:
            raise ValueError("--image needs --text")
        row = {"image": args.image, "text": args.text}
        if args.question is not None:
            row["question"] = args.question
        row["_line"] = 1
        return [row]
    if args.text or args.question:
        raise ValueError("--text/--question go with --image; with --input they come from each row")
    rows = read_jsonl(args.input, ("image", "text"))
    base = Path(args.input).resolve().parent
    for row in rows:
        if not isinstance(row["image"], str):
            raise ValueError(f"{args.input}: row {row['_line']}: 'image' must be a file path")
        row["image"] = resolve_path(row["image"], base)
    return rows


def _check(rows: list[dict], where: str) -> None:
    """Cheap checks on every row before the model loads."""
    for row in rows:
        n = row["_line"]
        if not os.path.isfile(row["image"]):
            raise ValueError(f"{where}row {n}: image file not found: {row['image']}")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError(f"{where}row {n}: empty or non-string 'text'")
        q = row.get("question")
        if q is not None and (not isinstance(q, str) or not q.strip()):
            raise ValueError(f"{where}row {n}: 'question' must be a non-empty string")


def run(args) -> int:
    from tqdm.auto import tqdm

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    rows = _rows(args)
    where = f"{args.input}: " if args.input else ""
    _check(rows, where)
    model = load_model(args)

    out_fh, tmp = sys.stdout, None
    if args.output:
        out_dir = Path(args.output).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".score-", suffix=".jsonl")
        out_fh = os.fdopen(fd, "w", encoding="utf-8")
    try:
        bar = tqdm(total=len(rows), desc="scoring", unit="row", file=sys.stderr, disable=args.input is None)
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            questions = [r.get("question") for r in batch]
            try:
                result = model.score([r["image"] for r in batch], [r["text"] for r in batch],
                                     questions if any(q is not None for q in questions) else None)
            except (ValueError, TypeError) as exc:
                raise ValueError(_name_row(str(exc), batch, where)) from None
            for row, scores in zip(batch, result.rows()):
                record = {k: v for k, v in row.items() if k != "_line"}
                record.update(scores)
                out_fh.write(json.dumps(record) + "\n")
            bar.update(len(batch))
        bar.close()
        if tmp:
            out_fh.close()
            os.replace(tmp, args.output)
            tmp = None
    finally:
        if tmp:
            out_fh.close()
            os.unlink(tmp)
    return 0


def _name_row(msg: str, batch: list[dict], where: str) -> str:
    """Engine errors name the sample index within the batch ("image 3: ..."); name the row instead."""
    import re

    m = re.match(r"^(image|text|question) (\d+): (.*)$", msg, flags=re.S)
    if m and int(m.group(2)) < len(batch):
        return f"{where}row {batch[int(m.group(2))]['_line']}: {m.group(1)}: {m.group(3)}"
    return f"{where}{msg}"
