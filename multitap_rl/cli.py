"""``multitap-rl``: a thin command-line layer over the library.

Each subcommand lives in ``multitap_rl.commands.<name>`` and exposes ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only for the command that runs. A module may also
declare:

* ``requirements(args) -> [(package, extra), ...]``: the optional packages this run will import.
  They are checked before ``run`` starts, all at once: one error names every missing package and
  the extras that bring them (not one after another, minutes apart);
* ``RESUMES = True``: an interrupted run continues where it stopped when run again (Ctrl-C says so);
* ``interrupted(args) -> str``: what Ctrl-C should say about this run (what it left, how to go on).

Errors: a :class:`~multitap_rl.errors.MultiTapError` (bad input, files, settings) or an ``OSError``
(a file that cannot be read or written) is printed as one line and exits with status 2; anything
else is a bug and keeps its traceback. Progress bars still open when a command fails are closed
first, so the error starts on a line of its own. Settings read from the environment
(``MULTITAP_MAX_IMAGE_PIXELS``) are checked before the command runs. Machine-readable output goes
to stdout alone; logging and progress bars go to stderr. Ctrl-C prints one line (``interrupted``,
and whether rerunning resumes) and exits with status 130, the shell's code for SIGINT (``-v``
keeps the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("multitap_rl.commands.demo", "the main job end to end: judge, heads, a captioner that learns (offline)"),
    "rerank": ("multitap_rl.commands.rerank", "rank candidate captions for an image (best-of-N)"),
    "score": ("multitap_rl.commands.score", "score image-text pairs with a MULTI-TAP checkpoint"),
    "train-stage1": ("multitap_rl.commands.train_stage1", "train a MULTI-TAP reward model (stage 1) from a YAML recipe"),
    "tiny": ("multitap_rl.commands.tiny", "write a tiny random base model + MULTI-TAP checkpoint (offline)"),
    "extract": ("multitap_rl.commands.extract", "write a dataset's features to a resumable feature store (stage 2)"),
    "fit-heads": ("multitap_rl.commands.fit_heads", "fit ridge heads for named dimensions on extracted features"),
    "eval": ("multitap_rl.commands.eval", "per-dimension metrics of heads and overall against targets"),
    "presets": ("multitap_rl.commands.presets", "list the weights presets and objective schemas with their dimensions"),
    "make-shapes": ("multitap_rl.commands.make_shapes", "write the built-in shapes task as images + JSONL (offline data)"),
    "precision": ("multitap_rl.commands.precision", "bf16/TF32 vs fp32 scores on your samples: |Δ| and ranking agreement"),
    "serve": ("multitap_rl.commands.serve", "serve the reward on Ray Serve (JSON API, OpenRLHF endpoint, replicas)"),
}


INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="multitap-rl", description="MULTI-TAP rewards for RL and reranking")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from .commands._common import set_result_stream
    from .distributed import exit_launched_process, launched_world_size
    from .errors import MultiTapError

    # Results go to stdout alone; anything else that prints while a command runs (third-party
    # libraries' notices, e.g. DeepSpeed's accelerator line) goes to stderr.
    set_result_stream(sys.stdout)
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        try:
            try:
                _check_environment()
                _check_requirements(module, args)
                with contextlib.redirect_stdout(sys.stderr):
                    code = int(module.run(args) or 0)
            except BaseException:
                _close_progress_bars()  # the error (or traceback) starts on a fresh line of stderr
                raise
        except (MultiTapError, OSError) as exc:
            if args.verbose:
                raise
            message = str(exc) if not isinstance(exc, OSError) or not exc.filename else \
                f"{exc.strerror or exc}: {exc.filename}"
            print(f"multitap-rl {args.command}: error: {message}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        hint = _interrupted_hint(sys.modules.get(COMMANDS[args.command][0]), args)
        print(f"multitap-rl {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return INTERRUPTED
    if code == 0 and launched_world_size() > 1:  # under accelerate launch / torchrun: leave together
        exit_launched_process(code)
    return code


def _check_requirements(module, args) -> None:
    """Every optional package this run needs, checked before any work: one ``MissingDependencyError``
    names all the missing ones and the extras that bring them."""
    from .errors import require_all

    needs = getattr(module, "requirements", None)
    if needs is not None:
        require_all(needs(args), "this command")


def _interrupted_hint(module, args) -> str:
    """What Ctrl-C says after "interrupted": the module's own words, or whether rerunning resumes."""
    if module is not None and hasattr(module, "interrupted"):
        return module.interrupted(args)
    resumes = getattr(module, "RESUMES", False)
    if not resumes or getattr(args, "dry_run", False) or getattr(args, "print_config", False):
        return ""
    if getattr(args, "overwrite", False):
        return "rerun the same command without --overwrite to resume (with it, the run starts again)"
    return "rerun the same command to resume"


def _check_environment() -> None:
    """The settings multitap-rl reads from environment variables, checked before any work (a bad one
    is a ``ConfigError`` naming the variable and its value)."""
    from .images import max_image_pixels

    max_image_pixels()


def _close_progress_bars() -> None:
    """Close every tqdm bar still open (a command that failed mid-way leaves its bar on the line):
    a bar kept on screen ends its line, a transient one is cleared, so what is printed next starts
    at the beginning of a line."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
