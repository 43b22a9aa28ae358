"""``multitap-rl extract``: write a dataset's last-position features to a resumable feature store.

Under ``accelerate launch -m multitap_rl.cli extract ...`` (or ``torchrun``) every rank loads the model on its
own device and writes its share of the chunks into the same store (see ``training/features.py``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ._common import extract_requirements as requirements  # noqa: F401  (cli.main checks them first)

RESUMES = True  # an interrupted extraction continues from its last chunk when run again
from ._common import add_model_arguments, emit, load_model


def add_arguments(p) -> None:
    add_model_arguments(p, heads=False)
    p.add_argument("--data", required=True,
                   help="JSONL/JSON file, parquet/CSV file, or a `datasets` save_to_disk directory")
    p.add_argument("--out", required=True, help="feature store directory (an interrupted run resumes here)")
    p.add_argument("--schema", default=None,
                   help="objective schema: a preset name (see `multitap-rl presets`) or a YAML file; default: the "
                        "column options below")
    p.add_argument("--split", default="train", help="split of a DatasetDict directory (default train)")
    p.add_argument("--image-column", default="image", help="without --schema (default image)")
    p.add_argument("--text-column", default="text", help="without --schema (default text)")
    p.add_argument("--question-column", default=None, help="without --schema: instruction-task question column")
    p.add_argument("--id-column", default=None, help="without --schema: a per-row id stored with the features")
    p.add_argument("--target-columns", default=None, help="without --schema: comma-separated numeric columns to store")
    p.add_argument("--chunk-size", type=int, default=256, help="rows per chunk file, the unit of resumption (256)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per model call (16)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _schema(args):
    from ..schemas import ObjectiveSchema, load_schema

    column_opts = [args.question_column, args.id_column, args.target_columns]
    if args.schema is not None:
        if any(v is not None for v in column_opts) or (args.image_column, args.text_column) != ("image", "text"):
            raise ConfigError("--schema and the --*-column options are exclusive (the schema names the columns)")
        return load_schema(args.schema)
    dims = [d.strip() for d in (args.target_columns or "").split(",") if d.strip()]
    return ObjectiveSchema.simple(dims, image=args.image_column, text=args.text_column,
                                  question=args.question_column, id_column=args.id_column)


def run(args) -> int:
    from ..data.rows import open_rows
    from ..distributed import launcher_group
    from ..training.features import check_target_columns, extract_features, load_features

    # 1. Cheap checks before the model loads: arguments, data readable, schema valid, every target
    #    column present in the data (a misspelt one would be stored as all-NaN), first row expands.
    for name in ("chunk_size", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    schema = _schema(args)
    src = open_rows(args.data, split=args.split, limit=args.limit)
    check_target_columns(schema, src, given_by=None if args.schema is not None else "--target-columns")
    schema.expand(src.rows(0, 1)[0], 0, where=src.where(0))
    # 2. Model, then the (resumable) extraction. Under `accelerate launch` / `torchrun` every rank
    #    loads the model on its own device and extracts its share of the chunks into the same store.
    with launcher_group() as (rank, world):
        model = load_model(args)
        out = extract_features(model, args.data, args.out, schema=schema, split=args.split,
                               chunk_size=args.chunk_size, batch_size=args.batch_size, limit=args.limit,
                               overwrite=args.overwrite, progress=not args.no_progress)
    if rank != 0:  # one summary line on stdout, from rank 0
        return 0
    fs = load_features(out)
    dims = ", ".join(fs.names) if fs.names else "none"
    procs = f"; {world} processes" if world > 1 else ""
    emit(f"{len(fs)} samples from {len(src)} rows -> {Path(out)} "
         f"(hidden size {fs.features.shape[1]}; targets: {dims}{procs})")
    return 0
