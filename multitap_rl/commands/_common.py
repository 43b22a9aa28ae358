"""Arguments and helpers shared by CLI subcommands."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["add_model_arguments", "load_model", "read_jsonl", "resolve_path"]


def add_model_arguments(p: argparse.ArgumentParser, *, heads: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, help="MULTI-TAP checkpoint: local directory or hub id")
    p.add_argument("--base-model", default=None, help="base LVLM: local directory or hub id")
    if heads:
        p.add_argument("--heads", default=None, help="stage-2 heads directory (fills the per-dimension scores)")
    p.add_argument("--device", default=None, help="torch device (default: this process's GPU, else cpu)")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--rope", default=None, choices=["reference", "mrope"], help="position scheme (default: reference)")
    p.add_argument("--image-size", type=_optional_int, default=560,
                   help="resize images to this square size before the processor (reference: 560; 'none': keep)")
    p.add_argument("--max-length", type=_max_length, default="auto",
                   help="truncate prompts to this many tokens as the reference does (default 'auto': the "
                        "backbone's reference value, 1024 or 16384 for InternLM-XComposer2.5; 'none': never)")


def _max_length(value: str) -> int | None | str:
    return "auto" if value.lower() == "auto" else _optional_int(value)


def _optional_int(value: str) -> int | None:
    if value.lower() in ("none", "null"):
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or 'none', got {value}")
    return n


def load_model(args):
    from ..model import MultiTapModel

    return MultiTapModel.from_pretrained(
        args.checkpoint, base_model=args.base_model, heads=getattr(args, "heads", None),
        device=args.device, dtype=args.dtype, rope=args.rope, image_size=args.image_size, max_length=args.max_length,
    )


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file; a bad line or missing field is a ``ValueError`` naming the row (1-based)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: row {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {n}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise ValueError(f"{path}: row {n}: missing field {key!r}")
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def resolve_path(value: str, base: Path) -> str:
    """A relative path is looked up next to the JSONL file first, then in the working directory."""
    p = Path(value)
    if p.is_absolute() or not (base / p).exists():
        return str(p)
    return str(base / p)
