"""``multitap-rl make-shapes DIR``: the built-in shapes task as image files + a JSONL file, for
trying stage 2 offline (extract -> fit-heads -> eval) or any command that reads data files.

``DIR`` is written all or nothing: an existing non-empty one is refused unless ``--overwrite``,
and then replaced fully when the new rows are written (no image of an earlier, larger set is
left behind); a failed or interrupted run leaves it as it was."""

from __future__ import annotations

from pathlib import Path

from ._common import emit, staged_output


def add_arguments(p) -> None:
    p.add_argument("dir", help="output directory (DIR/rows.jsonl and DIR/images/ are written)")
    p.add_argument("--n", type=int, default=256, help="rows (default 256)")
    p.add_argument("--seed", type=int, default=0, help="same seed -> same rows (default 0)")
    p.add_argument("--image-size", type=int, default=56, help="square image side in pixels (default 56)")
    p.add_argument("--p-correct", type=float, default=0.5, help="fraction of captions right in every attribute")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DIR written by make-shapes (all of it: rows.jsonl and images/)")


def run(args) -> int:
    from ..data.shapes import SHAPE_ATTRIBUTES, write_shapes_jsonl

    with staged_output(args.dir, overwrite=args.overwrite, what="make-shapes directory", marker="rows.jsonl",
                       option="DIR") as stage:
        write_shapes_jsonl(stage, args.n, seed=args.seed, image_size=args.image_size, p_correct=args.p_correct)
    path = Path(args.dir).expanduser() / "rows.jsonl"
    targets = ",".join(f"{a}_correct" for a in SHAPE_ATTRIBUTES)
    emit(f"{args.n} rows -> {path}\ncolumns: image, text, score, color, shape, position, n_wrong, {targets}")
    return 0
