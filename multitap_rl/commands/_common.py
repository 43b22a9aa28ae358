"""Arguments and helpers shared by CLI subcommands."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_model_arguments", "check_output_dir", "emit", "extract_requirements", "load_model", "model_spec",
           "optional_int", "result_stream", "set_result_stream", "stage1_requirements", "staged_output"]

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


STAGING_PREFIX = ".multitap-partial-"  # a run's output being written (see staged_output)


def _entries(out: Path) -> list[Path]:
    """What ``out`` holds, a staging folder left by a killed run aside (it counts as nothing)."""
    return [e for e in out.iterdir() if not e.name.startswith(STAGING_PREFIX)]


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, what: str, marker: str | tuple[str, ...],
                     option: str = "--out", clear: bool = True) -> Path:
    """The output directory ``path``, checked before any work -- the one rule of every command that
    writes a directory: a file there is an error; an existing non-empty directory is an error
    unless ``overwrite``, and then only a directory that is ours -- it holds ``marker`` (a file,
    or one of several) -- may be replaced. With ``clear`` it is emptied here (removed; the
    command writes it again); without, the caller replaces it when its output is complete (see
    :func:`staged_output`). ``option`` names the argument in the message (``--out``, ``DIR``)."""
    out = Path(os.fspath(path)).expanduser()
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is a file; pass a directory")
    if out.is_dir() and _entries(out):
        if not overwrite:
            raise ConfigError(f"{what} {out} already exists and is not empty; pass --overwrite to replace it, "
                              f"or another {option}")
        if not any((out / m).is_file() for m in markers):
            raise ConfigError(f"{what} {out} is not empty and holds no {' or '.join(markers)} (not an output of this "
                              "command?); refusing to replace it: pass an empty or new directory")
        if clear:
            shutil.rmtree(out)
    return out


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, *, overwrite: bool, what: str, marker: str | tuple[str, ...],
                  option: str = "--out") -> Iterator[Path]:
    """Write a command's output directory all or nothing: ``path`` is checked as
    :func:`check_output_dir` does (before any work), then created; the command writes into the
    yielded staging folder (inside ``path``), and only when the ``with`` block ends without an
    error is ``path`` made to hold exactly what was staged (everything else in it removed: no stale
    file of an earlier run). An error or Ctrl-C leaves ``path`` as it was (a folder this call
    created is removed again if it stayed empty)."""
    out = check_output_dir(path, overwrite=overwrite, what=what, marker=marker, option=option, clear=False)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    except OSError as exc:
        raise ConfigError(f"{what} {out}: cannot create it or write there ({exc.strerror or exc}); pass a writable "
                          "directory") from None
    done = False
    try:
        yield stage
        for entry in out.iterdir():
            if entry != stage:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in stage.iterdir():
            entry.rename(out / entry.name)
        stage.rmdir()
        done = True
    finally:
        if not done:
            shutil.rmtree(stage, ignore_errors=True)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()


# -- the optional packages of commands whose modules declare none (cli.main checks them first) --------
def stage1_requirements(args) -> list[tuple[str, str]]:
    """``train-stage1``: accelerate (training), peft (``train.finetune: lora``), deepspeed (under
    ``accelerate launch`` with DeepSpeed), datasets (data read from a file, directory or the hub)."""
    if args.print_config:
        return []
    from ..training.config import SHAPES_DATASET, load_stage1_config

    cfg = load_stage1_config(args.recipe, args.overrides)
    needs = []
    if not args.dry_run:
        needs.append(("accelerate", "train"))
        if cfg.train.finetune == "lora":
            needs.append(("peft", "train"))
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
            needs.append(("deepspeed", "train"))
    if cfg.data.dataset and cfg.data.dataset != SHAPES_DATASET:
        needs.append(("datasets", "train"))
    return needs


def extract_requirements(args) -> list[tuple[str, str]]:
    """``extract``: datasets, unless ``--data`` is a JSON/JSONL file (read directly)."""
    data = Path(args.data).expanduser()
    if not data.exists() or (data.is_file() and data.suffix.lower() in (".json", ".jsonl")):
        return []  # read directly (or missing: the command names it)
    return [("datasets", "train")]
