"""Arguments and helpers shared by CLI subcommands."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_model_arguments", "check_output_dir", "emit", "load_model", "model_spec", "optional_int", "result_stream",
           "set_result_stream"]

_RESULTS: list = [None]  # where results go (None: sys.stdout); the CLI sets the real stdout, the rest goes to stderr


def set_result_stream(stream) -> None:
    """Results (tables, JSON, JSONL) go to ``stream``; set by ``multitap_rl.cli.main``."""
    _RESULTS[0] = stream


def result_stream():
    return _RESULTS[0] or sys.stdout


def emit(*args, **kwargs) -> None:
    """``print`` to the result stream (stdout): machine-readable output and tables, nothing else."""
    stream = result_stream()
    print(*args, file=stream, **kwargs)
    stream.flush()


def add_model_arguments(p: argparse.ArgumentParser, *, heads: bool = True, dtype: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, help="MULTI-TAP checkpoint: local directory or hub id")
    p.add_argument("--base-model", default=None,
                   help="base LVLM: local directory or hub id (default: the one the checkpoint names)")
    if heads:
        p.add_argument("--heads", default=None, help="stage-2 heads directory (fills the per-dimension scores)")
    p.add_argument("--device", default=None, help="torch device (default: this process's GPU, else cpu)")
    if dtype:
        p.add_argument("--dtype", default=None,
                       help="bf16 | fp16 | fp32 | tf32 (fp32 weights, TF32 matmuls on CUDA; on CPU = fp32) (default: bf16 "
                            "on GPU, fp32 on CPU)")
    p.add_argument("--rope", default=None, choices=["reference", "mrope"], help="position scheme (default: reference)")
    p.add_argument("--image-size", type=optional_int, default="auto",
                   help="resize images to this square size before the processor ('none': keep; default: the "
                        "checkpoint's own setting, else the reference's 560)")
    p.add_argument("--max-length", type=optional_int, default="auto",
                   help="truncate prompts to this many tokens as the reference does ('none': never; default: the "
                        "checkpoint's own setting, else the backbone's reference value: 1024, 16384 for "
                        "InternLM-XComposer2.5)")


def optional_int(value: str) -> int | None | str:
    """An int >= 1, 'none' (None) or 'auto' (argparse type)."""
    if value.lower() in ("none", "null"):
        return None
    if value.lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'none' or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, 'none' or 'auto', got {value}")
    return n


def model_spec(args):
    """The :class:`~multitap_rl.spec.ModelSpec` of the model arguments (see :func:`add_model_arguments`)."""
    from ..spec import ModelSpec

    return ModelSpec(checkpoint=args.checkpoint, base_model=args.base_model, heads=getattr(args, "heads", None),
                     device=args.device, dtype=getattr(args, "dtype", None), rope=args.rope,
                     image_size=args.image_size, max_length=args.max_length)


def load_model(args):
    from ..model import MultiTapModel

    return MultiTapModel.from_spec(model_spec(args))


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, what: str, marker: str) -> Path:
    """The output directory ``path``, checked before any work: a file there is an error; an existing
    directory is an error unless ``overwrite`` (then it is emptied). ``marker`` is a file whose
    presence shows the directory is ours (only such a directory, or an empty one, is emptied)."""
    out = Path(os.fspath(path)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{what} {out} already exists; pass --overwrite to replace it, or another --out")
        if not (out / marker).is_file():
            raise ConfigError(f"{what} {out} is not empty and holds no {marker}; refusing to empty it")
        shutil.rmtree(out)
    return out
