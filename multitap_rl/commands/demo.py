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
``samples.png``, and the judge -- ``judge/model`` (its MULTI-TAP checkpoint, naming ``judge/base``
as its base model) and ``judge/heads`` -- for ``multitap-rl score`` / ``rerank`` afterwards (the
commands are printed at the end). With ``--checkpoint`` (a real MULTI-TAP model): score and rerank
candidate captions with ``--weights`` and run a few GRPO steps of ``--policy`` against that reward.

Every argument is checked before any work -- the packages it needs (one message naming every
missing one and its extra), the weightings, the step counts, the seed, options that need
``--checkpoint``, and ``--output-dir``: an existing non-empty one is refused unless
``--overwrite``. The output is written all or nothing: the run writes into a staging folder and
``--output-dir`` becomes exactly its result when the judge and the report are done (an earlier
run's files are all replaced; an interrupted or failed run leaves the folder as it was); the plots
come last, after ``report.json``, so a plotting failure cannot lose the results. An interrupted
demo cannot resume: run it again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from ._common import emit, staged_output

ATTRIBUTES = ("color", "shape", "position")


def add_arguments(p) -> None:
    p.add_argument("--output-dir", default="multitap-demo", help="where the report, plots and judge go (default: "
                   "./multitap-demo; kept after the run; an existing non-empty one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output-dir of an earlier demo (all its files, when this run is done)")
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


def _say(*args) -> None:
    """A phase message: on stderr with the progress bars (stdout carries the results: the table,
    the judge, the next steps, the report's path)."""
    print(*args, file=sys.stderr, flush=True)


def requirements(args) -> list[tuple[str, str]]:
    """The optional packages this run imports (checked by the CLI before any work): TRL's GRPO with
    accelerate and datasets, and matplotlib for the offline world's plots."""
    from ..world.captioner import REQUIREMENTS

    if args.checkpoint is not None:  # the real-model path: GRPO steps only
        return list(REQUIREMENTS) if args.grpo_steps is None or args.grpo_steps > 0 else []
    return [*REQUIREMENTS, ("matplotlib", "plots")]


_STATE: dict = {}  # what this process's demo has written so far, for interrupted()


def interrupted(args) -> str:
    """What Ctrl-C says: the demo cannot resume, and what it left in ``--output-dir``."""
    out = _STATE.get("out")
    if args.checkpoint is not None or out is None:
        return "the demo cannot resume and wrote nothing; run it again"
    if _STATE.get("committed"):
        return (f"the demo cannot resume; {out} holds its report.json and judge, but not every plot: run it again "
                "with --overwrite for the plots")
    return f"the demo cannot resume; {out} is as it was before this run (nothing of it was kept); run it again"


def _keep_example(report: dict, sheet, judge_dir: Path, final: Path) -> dict:
    """One held-out image and candidate captions beside the kept judge (``example.png``,
    ``candidates.txt``: the true caption, then one with each attribute wrong), so the commands
    printed at the end run as they are. Returns their final paths and the true caption."""
    from ..world.shapes_world import ATTRIBUTES, caption_of

    if not sheet:
        return {}
    sample = report["captioner"]["samples"][0]
    scene, pool = sample["scene"], report["config"]
    values = {"color": pool["colors"], "shape": pool["shapes"], "position": pool["positions"]}
    wrong = [caption_of(**{**scene, a: next(v for v in values[a] if v != scene[a])}) for a in ATTRIBUTES]
    sheet[0].save(judge_dir / "example.png")
    (judge_dir / "candidates.txt").write_text("\n".join([sample["truth"], *wrong]) + "\n")
    return {"image": str(final / "example.png"), "candidates": str(final / "candidates.txt"), "text": sample["truth"]}


def _next_steps(report: dict) -> list[str]:
    """Two commands to try the kept judge with (printed after the table), on the kept example."""
    saved = report["judge"].get("saved")
    if not saved or "image" not in saved:
        return []
    q = shlex.quote
    judge = f"--checkpoint {q(saved['model'])} --heads {q(saved['heads'])}"
    return ["next: score and rerank with the demo's judge (offline), e.g.",
            f"  multitap-rl score {judge} --image {q(saved['image'])} --text {q(saved['text'])}",
            f"  multitap-rl rerank {judge} --image {q(saved['image'])} --candidates {q(saved['candidates'])} "
            f"--weights {q(report['captioner']['weights'])}"]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run(args) -> int:
    _STATE.clear()
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
    out = Path(args.output_dir).expanduser().resolve()
    t = time.perf_counter()
    # Written all or nothing: the judge and report.json go to a staging folder that becomes `out`
    # when both are done; the plots (optional, matplotlib) come after the results are safe.
    with staged_output(out, overwrite=args.overwrite, what="--output-dir", marker="report.json",
                       option="--output-dir") as stage:
        _STATE["out"] = out
        emit(f"multitap-rl demo: the captioner world, seed {cfg.seed}; report, plots and judge go to {out}")
        with tempfile.TemporaryDirectory(prefix="multitap-demo-") as tmp:
            report, sheet = run_captioner_world(cfg, tmp, progress=args.progress, log=_say,
                                                keep_judge=stage / "judge", keep_judge_as=out / "judge")
        report["judge"]["saved"].update(_keep_example(report, sheet, stage / "judge", out / "judge"))
        report["targets"] = check_targets(report)
        report["plots"] = []
        _write_json(stage / "report.json", report)
    _STATE["committed"] = True  # the results are in `out`; the table, then the plots
    emit("")
    for line in final_table(report):
        emit(line)
    emit(f"\ntargets met: {report['targets']}  ({time.perf_counter() - t:.0f}s)")
    emit(f"judge: {out / 'judge'} (model: its MULTI-TAP checkpoint, base: its base model's files, heads: colour, "
         "shape, position)")
    for line in _next_steps(report):
        emit(line)
    report["plots"] = write_plots(report, sheet, out)
    _write_json(out / "report.json", report)
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
