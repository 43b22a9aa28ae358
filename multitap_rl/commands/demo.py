"""``multitap-rl demo``: the main job end to end.

1. a MULTI-TAP model: ``--checkpoint`` (hub id or directory), or offline a tiny seeded Qwen2-VL
   base model built in a temporary folder and trained right here with stage 1 (MSE reward head +
   backbone) on the built-in shapes task -- captions right or wrong about a shape's colour --
   until it beats the constant predictor (``--train-steps``, ~20 s on one CPU thread);
2. stage-2 heads: ``--heads DIR``, or offline, ridge heads fitted right here on the shapes task
   (is the caption's colour / shape / position right?);
3. score candidate captions for each image and rerank them with the user's ``--weights``;
4. a few GRPO steps of a captioner (the base model as policy) against the weighted reward.

Offline the judge is tiny and trained for seconds: it knows colours (what stage 1 taught it),
little else; the steps are the real pipeline.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time

from ._common import emit

ATTRIBUTES = ("color", "shape", "position")


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default=None, help="MULTI-TAP checkpoint (default: tiny offline model)")
    p.add_argument("--base-model", default=None, help="base LVLM of --checkpoint")
    p.add_argument("--heads", default=None, help="stage-2 heads directory (offline default: fitted here)")
    p.add_argument("--policy", default=None, help="captioner for the GRPO steps (default: the base model)")
    p.add_argument("--weights", default=None,
                   help='weights over dimensions, e.g. "overall=1,color=2" (default: overall=1 plus every head dim)')
    p.add_argument("--images", nargs="*", default=None, help="image files (default: generated shapes)")
    p.add_argument("--grpo-steps", type=int, default=2, help="GRPO steps to run (0: skip)")
    p.add_argument("--train-steps", type=int, default=300,
                   help="offline: stage-1 steps on the shapes task (0: score with the untrained random model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)


def _caption(scene, **change) -> str:
    from ..data.shapes import ShapeScene, shape_caption

    return shape_caption(ShapeScene(**{**scene.__dict__, **change}))


def _wrong(rng, pool, right):
    return rng.choice([v for v in pool if v != right])


def _fit_shape_heads(model, n: int = 96, seed: int = 0):
    """Heads for color/shape/position correctness, fitted on shapes-task captions."""
    from ..training.ridge import fit_ridge_heads
    from ..data.shapes import SHAPE_COLORS, SHAPE_KINDS, SHAPE_POSITIONS, ShapeScene, draw_shapes_image

    rng = random.Random(seed)
    pools = {"color": list(SHAPE_COLORS), "shape": list(SHAPE_KINDS), "position": list(SHAPE_POSITIONS)}
    images, texts, targets = [], [], {a: [] for a in ATTRIBUTES}
    for _ in range(n):
        scene = ShapeScene(**{a: rng.choice(pools[a]) for a in ATTRIBUTES})
        wrong = {a: _wrong(rng, pools[a], getattr(scene, a)) for a in ATTRIBUTES if rng.random() < 0.5}
        images.append(draw_shapes_image(scene, 112, rng))
        texts.append(_caption(scene, **wrong))
        for a in ATTRIBUTES:
            targets[a].append(0.0 if a in wrong else 1.0)
    from ..training.features import model_identity

    feats = model.features(images, texts)
    overall = model.score_features(feats).overall
    return fit_ridge_heads(feats, targets, overall=overall, fingerprint=model_identity(model))


# Stage 1 offline: recipes/stage1/tiny_shapes.yaml's settings (a base with weights of std 0.125
# leaves the constant-predictor plateau within ~100-350 steps for every seed we swept).
_STAGE1 = {
    "model": {"image_size": 56},
    "data": {"dataset": "shapes", "dataset_kwargs": {"n_train": 512, "n_eval": 128, "attributes": ["color"],
                                                    "colors": ["red", "green", "blue"]}},
    "train": {"learning_rate": 1e-3, "head_learning_rate": 1e-2, "lr_scheduler": "constant", "batch_size": 32,
              "eval_batch_size": 32, "progress": False, "resume": "never", "mixed_precision": "no"},
}


def _offline_model(tmp: str, steps: int):
    """(base dir, checkpoint dir, image size): the tiny base, and a stage-1 model trained on it
    (``steps`` > 0) or the tiny random checkpoint (``steps`` == 0)."""
    from ..testing import build_tiny_multitap, build_tiny_qwen2_vl

    if steps <= 0:
        base, ckpt = build_tiny_multitap(tmp, seed=0)
        emit(f"[1/4] offline: tiny random models written to {tmp} (untrained: their scores mean nothing)")
        return base, ckpt, 560
    from ..training import train_stage1

    base = build_tiny_qwen2_vl(f"{tmp}/base", seed=0, initializer_range=0.125)  # no reward checkpoint: trained next
    cfg = {k: dict(v) for k, v in _STAGE1.items()}
    cfg["model"]["base_model"] = str(base)
    cfg["train"].update(output_dir=f"{tmp}/stage1", max_steps=steps, eval_every=steps)
    t = time.perf_counter()
    res = train_stage1(cfg)
    m = res.metrics
    emit(f"[1/4] offline: tiny Qwen2-VL base written to {tmp}; stage 1 on the shapes task (is the caption's "
          f"colour right?): {steps} steps in {time.perf_counter() - t:.0f}s, validation MSE {m['mse']:.4f} vs "
          f"{m['baseline_mse']:.4f} for the constant predictor")
    return base, res.model_dirs["multitap"], _STAGE1["model"]["image_size"]


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


def run(args) -> int:
    from ..model import MultiTapModel
    from ..data.shapes import SHAPE_COLORS, SHAPE_KINDS, SHAPE_POSITIONS, ShapeScene, draw_shapes_image
    _quiet()
    with tempfile.TemporaryDirectory(prefix="multitap-demo-") as tmp:
        # 1. Model.
        if args.checkpoint is None:
            base, ckpt, image_size = _offline_model(tmp, args.train_steps)
        else:
            base, ckpt, image_size = args.base_model, args.checkpoint, 560
            emit(f"[1/4] loading {ckpt}")
        model = MultiTapModel.from_pretrained(ckpt, base_model=base, heads=args.heads, device=args.device,
                                              dtype=args.dtype, image_size=image_size)

        # 2. Heads.
        if model.heads is None and args.checkpoint is None:
            t = time.perf_counter()
            model.load_heads(_fit_shape_heads(model))
            emit(f"[2/4] fitted stage-2 heads {list(model.heads.names)} on 96 shapes-task captions "
                  f"in {time.perf_counter() - t:.1f}s")
        else:
            emit(f"[2/4] dimensions: {list(model.dimension_names)}")
        weights = args.weights or ",".join(f"{d}=1" for d in model.dimension_names)

        # 3. Score and rerank.
        rng = random.Random(1)
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
        from reward_fns import rerank

        ranked = rerank(images, candidates, weights, model_or_path=model)
        emit(f"[3/4] candidates ranked by reward with weights {weights}:")
        for i, lst in enumerate(ranked):
            emit(f"  image {i}:")
            for rank, c in enumerate(lst, start=1):
                dims = " ".join(f"{k}={v:.3f}" for k, v in c.dims.items())
                emit(f"    {rank}. {c.reward:+.3f}  {c.text!r:42} {dims}")

        # 4. GRPO steps.
        if args.grpo_steps > 0:
            import torch

            from reward_fns import build_captioner_trainer, captioning_dataset, multitap_reward

            torch.manual_seed(0)
            reward = multitap_reward(model, weights=weights)
            trainer = build_captioner_trainer(
                args.policy or str(base), reward, captioning_dataset(images + images[:1]),
                output_dir=f"{tmp}/grpo", num_generations=2, batch_size=4, max_completion_length=12,
                max_steps=args.grpo_steps, learning_rate=1e-5, disable_tqdm=True,
            )
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
            trainer.train()
            logged = [h for h in trainer.state.log_history if "reward" in h]
            emit(f"[4/4] GRPO: {len(logged)} steps against the weighted reward; mean reward per step: "
                  + ", ".join(f"{h['reward']:.3f}" for h in logged))
        else:
            emit("[4/4] GRPO skipped (--grpo-steps 0)")
    return 0
