"""``multitap-rl demo``: the main job end to end.

Offline (the default): the captioner world (:mod:`multitap_rl.world`) --

1. the judge: a tiny seeded Qwen2-VL base trained here as a MULTI-TAP reward model with stage 1
   on the shapes task, plus stage-2 heads (colour / shape / position correctness); its quality;
2. a tiny Qwen2-VL captioner, warm-started on the caption *format* only (attributes drawn at
   random, so held-out accuracy starts at chance);
3. TRL GRPO against ``reward_fns.multitap_reward(judge, weights=--weights)``;
4. held-out accuracy per attribute, judged by string matching against the scene (never by the
   reward model), before, during and after; ``--steering`` adds one run per ``--steer-weights``;
   ``--multi-objective`` also trains each ``--multi-weights`` weighting as one weighted reward and
   as one reward per dimension under TRL's ``normalize_then_sum`` (``tradeoff.png``).

Writes ``--output-dir``: ``report.json``, ``reward_curve.png``, ``heldout_accuracy.png``,
``samples.png``. With ``--checkpoint`` (a real MULTI-TAP model): score and rerank candidate
captions with ``--weights`` and run a few GRPO steps of ``--policy`` against that reward.

Every argument is checked before any work -- the weightings, the step counts, the seed, options
that need ``--checkpoint``, and that ``--output-dir`` can be created and written (a probe file is
written there and removed) -- so a bad one fails in a second, not after minutes of training.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from ._common import emit

ATTRIBUTES = ("color", "shape", "position")


def add_arguments(p) -> None:
    p.add_argument("--output-dir", default="multitap-demo", help="where the report and plots go (default: "
                   "./multitap-demo; kept after the run)")
    p.add_argument("--seed", type=int, default=0, help="seeds every phase")
    p.add_argument("--steering", action="store_true",
                   help="also one warm start + GRPO per weighting in --steer-weights")
    p.add_argument("--weights", default=None,
                   help='weights over dimensions (offline: overall, color, shape, position; default "color=1")')
    p.add_argument("--steer-weights", default="color=1;position=1",
                   help="';'-separated weightings for --steering (default: color=1;position=1)")
    p.add_argument("--multi-objective", action="store_true",
                   help="also train --multi-weights as one weighted reward (sum) and as one reward per dimension "
                        "under TRL's normalize_then_sum, beside the single-dimension runs of --steer-weights; "
                        "report.json gets 'multi_objective', and tradeoff.png is drawn")
    p.add_argument("--multi-weights", default="color=1,position=1",
                   help="';'-separated weightings for --multi-objective (default: color=1,position=1)")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (offline default 300; --checkpoint: 2)")
    p.add_argument("--warm-steps", type=int, default=300, help="offline: warm-start (format) steps")
    p.add_argument("--judge-steps", type=int, default=900,
                   help="offline: stage-1 steps on graded colour + position, after 300 on colour")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g = p.add_argument_group("with a real MULTI-TAP model")
    g.add_argument("--checkpoint", default=None, help="MULTI-TAP checkpoint (hub id or directory)")
    g.add_argument("--base-model", default=None, help="base LVLM of --checkpoint")
    g.add_argument("--heads", default=None, help="stage-2 heads directory")
    g.add_argument("--policy", default=None, help="Qwen2-VL captioner for the GRPO steps (default: the base model)")
    g.add_argument("--images", nargs="*", default=None, help="image files (default: generated shapes)")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None)


def _caption(scene, **change) -> str:
    from ..data.shapes import ShapeScene, shape_caption

    return shape_caption(ShapeScene(**{**scene.__dict__, **change}))


def _wrong(rng, pool, right):
    return rng.choice([v for v in pool if v != right])


def _quiet() -> None:
    """The demo prints its own summary: silence library progress bars and deprecation chatter."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    logging.getLogger("multitap_rl.training").setLevel(logging.WARNING)  # the demo prints its own summary
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


_CHECKPOINT_ONLY = ("base_model", "heads", "policy", "device", "dtype")


def _check_offline_arguments(args) -> None:
    """The options of the real-model path are refused without ``--checkpoint`` (never ignored)."""
    if args.images:
        raise ConfigError("--images needs --checkpoint (the offline world draws its own held-out images)")
    given = [f"--{name.replace('_', '-')}" for name in _CHECKPOINT_ONLY if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} need(s) --checkpoint: the offline world trains its own judge and "
                          "captioner on the CPU")


def _writable_output_dir(value: str) -> Path:
    """``--output-dir`` resolved, created and proven writable (a probe file written and removed)
    before any work; a ``ConfigError`` saying why not otherwise (a file there or above it, no
    permission, a read-only file system)."""
    out = Path(value).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".multitap-demo-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--output-dir {out}: cannot create it or write there ({exc.strerror or exc}); pass a "
                          "writable directory") from None
    return out


def run(args) -> int:
    _quiet()
    if args.checkpoint is not None:
        return _run_checkpoint(args)
    _check_offline_arguments(args)
    from ..world import CaptionerWorldConfig, run_captioner_world
    from ..world.captioner import check_targets
    from ..world.report import final_table, write_plots

    # Every argument is checked here, before any training; the output directory last (it is created).
    cfg = CaptionerWorldConfig(
        seed=args.seed, weights=args.weights or "color=1",
        steering=tuple(w.strip() for w in args.steer_weights.split(";") if w.strip())
        if args.steering or args.multi_objective else (),
        multi_objective=tuple(w.strip() for w in args.multi_weights.split(";") if w.strip())
        if args.multi_objective else (),
        grpo_steps=300 if args.grpo_steps is None else args.grpo_steps, warm_steps=args.warm_steps,
        judge_steps=args.judge_steps)
    if args.steering and not cfg.steering:
        raise ConfigError("--steering needs at least one weighting in --steer-weights")
    if args.multi_objective and not cfg.multi_objective:
        raise ConfigError("--multi-objective needs at least one weighting in --multi-weights")
    out = _writable_output_dir(args.output_dir)
    emit(f"multitap-rl demo: the captioner world, seed {cfg.seed}; report and plots go to {out}")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="multitap-demo-") as tmp:
        report, sheet = run_captioner_world(cfg, tmp, progress=args.progress, log=emit)
    report["plots"] = write_plots(report, sheet, out)
    report["targets"] = check_targets(report)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    emit("")
    for line in final_table(report):
        emit(line)
    emit(f"\ntargets met: {report['targets']}  ({time.perf_counter() - t:.0f}s)")
    emit(f"report: {out / 'report.json'}; plots: {', '.join(str(out / p) for p in report['plots'])}")
    return 0


def _check_checkpoint_arguments(args) -> None:
    """What the real-model path can check before the model loads: the seed, the step count, the
    weights' syntax (their names need the model's dimensions) and the image files."""
    from ..combiner import Weights
    from ..world.captioner import check_seed

    check_seed(args.seed, "--seed")
    if args.grpo_steps is not None and args.grpo_steps < 0:
        raise ConfigError(f"--grpo-steps must be >= 0, got {args.grpo_steps}")
    if args.weights is not None:
        Weights.parse(args.weights)
    missing = [str(f) for f in args.images or () if not Path(f).expanduser().is_file()]
    if missing:
        raise ConfigError(f"--images: file(s) not found: {', '.join(missing)}")


def _run_checkpoint(args) -> int:
    """A real MULTI-TAP model: rerank candidate captions with the weights, a few GRPO steps."""
    from reward_fns import rerank

    from ..data.shapes import (
        SHAPE_COLORS,
        SHAPE_KINDS,
        SHAPE_POSITIONS,
        ShapeScene,
        draw_shapes_image,
    )
    from ..combiner import Weights
    from ..model import MultiTapModel

    _check_checkpoint_arguments(args)
    model = MultiTapModel.from_pretrained(args.checkpoint, base_model=args.base_model, heads=args.heads,
                                          device=args.device, dtype=args.dtype)

    weights = args.weights or ",".join(f"{d}=1" for d in model.dimension_names)
    Weights.parse(weights).check(model.dimension_names)
    emit(f"[1/3] loaded {args.checkpoint}; dimensions: {list(model.dimension_names)}")
    rng = random.Random(args.seed)
    if args.images:
        images = list(args.images)
        candidates = [["A photo.", "A red circle on the left.", "Two dogs sitting on the grass."]] * len(images)
    else:
        scenes = [ShapeScene(color=c, shape=s, position=p) for c, s, p in
                  [("red", "circle", "left"), ("blue", "square", "top"), ("green", "triangle", "center")]]
        images = [draw_shapes_image(sc, 112, rng) for sc in scenes]
        candidates = [[_caption(sc), _caption(sc, color=_wrong(rng, list(SHAPE_COLORS), sc.color)),
                       _caption(sc, shape=_wrong(rng, list(SHAPE_KINDS), sc.shape)),
                       _caption(sc, position=_wrong(rng, list(SHAPE_POSITIONS), sc.position))]
                      for sc in scenes]
    ranked = rerank(model, images, candidates, weights=weights)
    emit(f"[2/3] candidates ranked by reward with weights {weights}:")
    for i, lst in enumerate(ranked):
        emit(f"  image {i}:")
        for rank, c in enumerate(lst, start=1):
            dims = " ".join(f"{k}={v:.3f}" for k, v in c.dims.items())
            emit(f"    {rank}. {c.reward:+.3f}  {c.text!r:42} {dims}")
    steps = 2 if args.grpo_steps is None else args.grpo_steps
    if steps <= 0:
        emit("[3/3] GRPO skipped (--grpo-steps 0)")
        return 0
    import torch
    from transformers import PrinterCallback

    from reward_fns import build_captioner_trainer, captioning_dataset, multitap_reward

    policy = args.policy or args.base_model or model.info.get("base_model")
    if not policy:
        raise ConfigError("--policy (a Qwen2-VL captioner) is needed for the GRPO steps: the checkpoint names "
                          "no base model")
    torch.manual_seed(args.seed)
    reward = multitap_reward(model, weights=weights)
    with tempfile.TemporaryDirectory(prefix="multitap-demo-") as tmp:
        trainer = build_captioner_trainer(
            str(policy), reward, captioning_dataset(images + images[:1]), output_dir=f"{tmp}/grpo",
            num_generations=2, batch_size=4, max_completion_length=12, max_steps=steps, learning_rate=1e-5,
            disable_tqdm=not args.progress)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]
    emit(f"[3/3] GRPO: {len(logged)} steps against the weighted reward; mean reward per step: "
         + ", ".join(f"{h['reward']:.3f}" for h in logged))
    return 0
