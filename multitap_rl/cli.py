"""``multitap-rl``: a thin command-line layer over the library.

Each subcommand lives in ``multitap_rl.commands.<name>`` and exposes ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only for the command that runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("multitap_rl.commands.demo", "score and rerank captions end to end (tiny offline models by default)"),
    "rerank": ("multitap_rl.commands.rerank", "rank candidate captions for an image (best-of-N)"),
    "score": ("multitap_rl.commands.score", "score image-text pairs with a MULTI-TAP checkpoint"),
    "train-stage1": ("multitap_rl.commands.train_stage1", "train a MULTI-TAP reward model (stage 1) from a YAML recipe"),
    "tiny": ("multitap_rl.commands.tiny", "write a tiny random base model + MULTI-TAP checkpoint (offline)"),
    "extract": ("multitap_rl.commands.extract", "write a dataset's features to a resumable feature store (stage 2)"),
    "fit-heads": ("multitap_rl.commands.fit_heads", "fit ridge heads for named dimensions on extracted features"),
    "eval": ("multitap_rl.commands.eval", "per-dimension metrics of heads and overall against targets"),
}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="multitap-rl", description="MULTI-TAP rewards for RL and reranking")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        print(f"multitap-rl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
