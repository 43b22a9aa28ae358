"""``multitap-rl tiny DIR``: write a tiny random Qwen2-VL base model and MULTI-TAP checkpoint.

The checkpoint names its base model (``DIR/base``, as an absolute path, in
``DIR/reward/multitap_config.json``), so ``--checkpoint DIR/reward`` needs no ``--base-model``."""

from __future__ import annotations

from ._common import emit


def add_arguments(p) -> None:
    p.add_argument("dir", help="output directory (DIR/base and DIR/reward are written)")
    p.add_argument("--seed", type=int, default=0, help="same seed -> same weights, byte for byte (default 0)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="tiny (tests) or small (benchmarks)")
    p.add_argument("--initializer-range", type=float, default=0.02,
                   help="std of the random weights (default 0.02 as Qwen; ~0.125 trains quickly, see "
                        "recipes/stage1/tiny_shapes.yaml)")


def run(args) -> int:
    from ..testing import build_tiny_multitap

    base, reward = build_tiny_multitap(args.dir, seed=args.seed, size=args.size,
                                       initializer_range=args.initializer_range, name_base_model=True)
    emit(f"base model: {base}\ncheckpoint: {reward}")
    return 0
