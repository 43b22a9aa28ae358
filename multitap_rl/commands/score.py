"""``multitap-rl score``: score image-text pairs; one JSON object per input row, in order.

Each output row is the input row unchanged (its own fields, ``image`` as written) plus one key,
``multitap`` by default (``--score-key``), holding ``{"overall": ..., <dim>: ...}`` -- or
``{"error": "..."}`` for a row that could not be scored under ``--on-invalid skip``. A row that
already has that key is refused (nothing of the user's is overwritten). Relative image paths are
read next to the JSONL file.

Output is all or nothing: ``--output`` is written to a temporary file renamed into place when
every row is scored; on stdout the rows are held until every row is scored, so a run that fails
half-way writes nothing there either.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError, DataError, SampleError
from ._common import add_model_arguments, load_model, result_stream


def add_arguments(p) -> None:
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image file (with --text)")
    src.add_argument("--input", help='JSONL rows {"image": path, "text": str, "question"?: str, ...}')
    p.add_argument("--text", help="the caption or response to score (with --image)")
    p.add_argument("--question", default=None, help="instruction-task question (with --image)")
    p.add_argument("--output", default=None,
                   help="write JSONL here, atomically (default: stdout, written once every row is scored: a run that "
                        "fails writes nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--score-key", default="multitap", help="the key each row's scores go under (default multitap)")
    p.add_argument("--on-invalid", default="raise", choices=["raise", "skip"],
                   help="a row that cannot be scored: stop with an error naming it (raise, the default), or skip it "
                        "(the row is written with {\"error\": ...} under the score key)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per model call (default 32)")


def _rows(args) -> tuple[list[dict], list[int], Path | None, str]:
    """(rows as given, their line numbers, the image root, how errors name the source)."""
    from ..data.rows import read_json_rows

    if args.image is not None:
        if args.text is None:
            raise ConfigError("--image needs --text (the caption or response to score)")
        if not args.text.strip():
            raise ConfigError("--text is empty; give the caption or response to score")
        row = {"image": args.image, "text": args.text}
        if args.question is not None:
            row["question"] = args.question
        return [row], [1], None, "--image/--text"
    if args.text is not None or args.question is not None:
        raise ConfigError("--text/--question go with --image; with --input they come from each row")
    path = Path(args.input)
    if not path.is_file():
        raise ConfigError(f"--input {args.input}: no such file")
    rows, lines = read_json_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, lines, path.resolve().parent, str(path)


def _problem(row: dict, root: Path | None, score_key: str):
    """(image to score, None) for a good row, or (None, SampleError) naming what is wrong with it."""
    from ..data.rows import resolve_image

    if score_key in row:
        return None, SampleError(None, score_key, f"the row already has a {score_key!r} field; pass --score-key "
                                                  "with another name (scores never overwrite a row's fields)")
    for key in ("image", "text"):
        if key not in row:
            return None, SampleError(None, key, f"missing field {key!r}")
    if not isinstance(row["image"], str):
        return None, SampleError(None, "image", "must be a file path")
    image = resolve_image(row["image"], root)
    if not os.path.isfile(image):
        return None, SampleError(None, "image", f"file not found: {image}")
    if not isinstance(row["text"], str) or not row["text"].strip():
        return None, SampleError(None, "text", "empty or not a string")
    q = row.get("question")
    if q is not None and (not isinstance(q, str) or not q.strip()):
        return None, SampleError(None, "question", "must be a non-empty string")
    return image, None


def _open_output(args):
    """(file handle, temporary path or None): the output is checked before any scoring. Without
    ``--output`` the handle is an in-memory buffer, copied to stdout only when every row is scored."""
    if not args.output:
        return io.StringIO(), None
    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"--output {out} is a directory; give a file path")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--output {out} exists; pass --overwrite to replace it")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.resolve().parent, prefix=f".{out.name}.", suffix=".tmp")
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


def _flush_to_stdout(text: str) -> None:
    """Write every scored row to the result stream (stdout) at once."""
    stream = result_stream()
    stream.write(text)
    stream.flush()


def run(args) -> int:
    from tqdm.auto import tqdm

    # 1. Everything checkable before the model loads: arguments, output path, every row.
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if not args.score_key:
        raise ConfigError("--score-key must not be empty")
    rows, lines, root, source = _rows(args)
    skip = args.on_invalid == "skip"
    images: list[str | None] = []
    errors: dict[int, SampleError] = {}
    for k, row in enumerate(rows):
        image, problem = _problem(row, root, args.score_key)
        images.append(image)
        if problem is not None:
            named = problem.at(lines[k], unit="line", source=source)
            if not skip:
                raise named
            errors[k] = named
    out_fh, tmp = _open_output(args)

    # 2. Score in batches, in order; bad rows stop the run or are written with their error. The bar
    # is closed on any exit, so an error starts on a line of its own.
    try:
        model = load_model(args)
        with tqdm(total=len(rows), desc="scoring", unit="row", file=sys.stderr, disable=args.input is None) as bar:
            for start in range(0, len(rows), args.batch_size):
                idx = [k for k in range(start, min(start + args.batch_size, len(rows))) if k not in errors]
                scores: dict[int, dict] = {}
                if idx:
                    questions = [rows[k].get("question") for k in idx]
                    try:
                        result = model.score([images[k] for k in idx], [rows[k]["text"] for k in idx],
                                             questions if any(q is not None for q in questions) else None,
                                             on_invalid=args.on_invalid)
                    except SampleError as exc:
                        raise exc.at(lines[idx[exc.index]], unit="line", source=source) from exc
                    per_row = result.rows()
                    for j, k in enumerate(idx):
                        if j in result.errors:
                            errors[k] = result.errors[j].at(lines[k], unit="line", source=source)
                        else:
                            scores[k] = per_row[j]
                for k in range(start, min(start + args.batch_size, len(rows))):
                    value = scores[k] if k in scores else {"error": str(errors[k])}
                    out_fh.write(json.dumps({**rows[k], args.score_key: value}, ensure_ascii=False) + "\n")
                bar.update(min(args.batch_size, len(rows) - start))
        if tmp:
            out_fh.close()
            os.replace(tmp, args.output)
            tmp = None
        else:
            _flush_to_stdout(out_fh.getvalue())
    finally:
        if tmp:
            out_fh.close()
            os.unlink(tmp)
    # 3. Say where the output went (a file, or many rows; one pair on stdout needs no receipt).
    if args.output is None and args.input is None:
        return 0
    where = args.output or "stdout"
    print(f"scored {len(rows) - len(errors)} of {len(rows)} row(s) -> {where}"
          + (f"; {len(errors)} row(s) skipped with their error" if errors else ""), file=sys.stderr)
    return 0
