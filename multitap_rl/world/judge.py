"""The captioner world's judge: a tiny seeded Qwen2-VL trained as a MULTI-TAP reward model.

1. stage 1 (:func:`multitap_rl.training.train_stage1`, MSE on a sigmoid head) as a curriculum:
   colour only, then graded colour + position on captions of which a fraction are off format
   (words dropped / cut / repeated / junk) and count as right about nothing;
2. stage 2: ridge heads (colour / shape / position correctness) on fresh captions; each head is
   refitted blind to the other attributes (mean-difference erasure), so a weight on one
   dimension rewards that attribute and not its correlates;
3. quality on fresh images: validation MSE vs the constant predictor; per head, held-out
   pairwise accuracy (the true caption scores above the caption with that attribute wrong) and
   top-1 accuracy (the true value scores highest among all values).

:func:`save_judge` keeps it as files any command reads (``multitap-rl score --checkpoint
DIR/model --heads DIR/heads``): the checkpoint names its base model, whose files are kept beside it.
"""

from __future__ import annotations

import random
from pathlib import Path

from .shapes_world import (
    ATTRIBUTES,
    caption_of,
    draw,
    judge_target,
    malform,
    random_scenes,
    well_formed,
)


def _stage1_rows(n: int, seed: int, cfg, pool) -> list[dict]:
    from ..data.shapes import make_shapes_records
    from ..testing.text import _WORDS

    attrs = list(cfg.judge_attributes)
    rows = make_shapes_records(n, seed=seed, scoring="graded", attributes=attrs, colors=pool["color"],
                               shapes=pool["shape"], positions=pool["position"], image_size=cfg.image_size)
    rng = random.Random(seed + 1)
    out = []
    for r in rows:
        text = malform(r["text"], rng, _WORDS) if rng.random() < cfg.malformed else r["text"]
        score = sum(judge_target(text, a, r[a], pool) for a in attrs) / len(attrs)
        out.append({"image": r["image"], "text": text, "score": float(score)})
    return out


def train_judge(out: Path, cfg, pool, progress: bool = False) -> tuple[Path, Path, dict]:
    """Build the tiny base in ``out/base`` and train stage 1 on it; returns (base dir, model dir,
    final eval metrics)."""
    from ..testing import build_tiny_qwen2_vl
    from ..training import train_stage1

    base = build_tiny_qwen2_vl(out / "base", seed=cfg.seed, initializer_range=0.125)
    train = {"learning_rate": cfg.judge_lr, "head_learning_rate": 1e-2, "lr_scheduler": "constant",
             "batch_size": 32, "eval_batch_size": 32, "progress": progress, "resume": "never",
             "mixed_precision": "no", "seed": cfg.seed, "log_every": 10**9}
    model = {"image_size": cfg.image_size, "base_model": str(base)}
    # Phase A: is the colour right? (a base of weights with std 0.125 leaves the constant-predictor
    # plateau here reliably; the graded task alone does not, from random weights.)
    res = train_stage1({
        "model": model,
        "data": {"dataset": "shapes", "dataset_kwargs": {
            "n_train": 512, "n_eval": 128, "attributes": ["color"], "colors": pool["color"],
            "shapes": pool["shape"], "positions": pool["position"], "seed": cfg.seed}},
        "train": {**train, "output_dir": str(out / "stage1-color"), "max_steps": cfg.judge_color_steps,
                  "eval_every": cfg.judge_color_steps}})
    if cfg.judge_steps > 0:
        # Phase B from phase A's model: graded over the judge's attributes, off-format captions included.
        res = train_stage1({
            "model": {**model, "checkpoint": str(res.model_dirs["multitap"])},
            "data": {"dataset": "shapes"},
            "train": {**train, "output_dir": str(out / "stage1"), "max_steps": cfg.judge_steps,
                      "eval_every": cfg.judge_steps}},
            train_data=_stage1_rows(cfg.judge_n_train, cfg.seed, cfg, pool),
            eval_data=_stage1_rows(128, cfg.seed + 10_007, cfg, pool))
    return base, Path(res.model_dirs["multitap"]), {k: float(v) for k, v in res.metrics.items()}


def _erase_other_attributes(heads, feats, targets, rows_ok):
    """Refit each head blind to the other attributes: before fitting head ``a``, project out of the
    features the directions along which captions right and wrong about each other attribute
    differ on average (on well-formed captions). Each head stays one linear map of the raw
    features (coef = P_a @ c_a)."""
    import numpy as np

    from ..heads import RidgeHeads
    from ..training.ridge import fit_ridge_heads

    X = feats.double().cpu().numpy()
    ok = np.asarray(rows_ok, dtype=bool)
    Y = {a: np.asarray(targets[a], dtype=float) for a in heads.names}
    diff = {b: X[ok][Y[b][ok] > 0.5].mean(0) - X[ok][Y[b][ok] < 0.5].mean(0) for b in heads.names}
    coef, intercept = np.zeros((X.shape[1], len(heads.names))), np.zeros(len(heads.names))
    for j, a in enumerate(heads.names):
        Q, _ = np.linalg.qr(np.stack([diff[b] for b in heads.names if b != a], axis=1))
        P = np.eye(X.shape[1]) - Q @ Q.T
        one = fit_ridge_heads(X @ P, {a: Y[a]})
        coef[:, j] = P @ one.coef[:, 0].numpy()
        intercept[j] = float(one.intercept[0])
    pred = X @ coef + intercept
    stats = {**heads.stats, **{a: (float(pred[:, j].mean()), float(pred[:, j].std()) or 1.0)
                               for j, a in enumerate(heads.names)}}
    return RidgeHeads(heads.names, coef, intercept, fingerprint=heads.fingerprint, stats=stats,
                      meta={**heads.meta, "erased": "mean-difference directions of the other attributes"})


def load_judge(base: Path, model_dir: Path, cfg, pool, n_heads: int | None = None):
    """The stage-1 model with stage-2 heads (colour / shape / position) fitted on fresh captions
    of fresh images, each attribute independently wrong with p = 0.5."""
    from ..model import MultiTapModel
    from ..testing.text import _WORDS
    from ..training.features import model_identity
    from ..training.ridge import fit_ridge_heads

    judge = MultiTapModel.from_pretrained(model_dir, base_model=str(base), image_size=cfg.image_size)
    rng = random.Random(cfg.seed * 7919 + 1)
    scenes = random_scenes(rng, n_heads or cfg.heads_n, pool)
    images = draw(scenes, cfg.image_size, rng)
    texts, targets = [], {a: [] for a in ATTRIBUTES}
    for sc in scenes:
        said = {a: getattr(sc, a) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            if rng.random() < 0.5:
                said[a] = rng.choice([v for v in pool[a] if v != said[a]])
        text = caption_of(**said)
        if rng.random() < cfg.malformed:
            text = malform(text, rng, _WORDS)
        texts.append(text)
        for a in ATTRIBUTES:
            targets[a].append(judge_target(text, a, getattr(sc, a), pool))
    feats = judge.features(images, texts)
    heads = fit_ridge_heads(feats, targets, overall=judge.score_features(feats).overall,
                            fingerprint=model_identity(judge))
    heads = _erase_other_attributes(heads, feats, targets, [well_formed(t, pool) for t in texts])
    judge.load_heads(heads)
    return judge


def judge_quality(judge, cfg, pool, n: int = 200) -> dict:
    """Per head on ``n`` fresh images: ``pairwise_accuracy`` (the true caption scores above the
    caption with that attribute wrong) and ``top1_accuracy`` (the true value scores highest)."""
    import torch

    rng = random.Random(cfg.seed * 7919 + 2)
    scenes = random_scenes(rng, n, pool)
    images = draw(scenes, cfg.image_size, rng)
    true = judge.score(images, [caption_of(sc.color, sc.shape, sc.position) for sc in scenes])
    out = {}
    for a in ATTRIBUTES:
        wrong = [caption_of(**{**sc.__dict__, a: rng.choice([v for v in pool[a] if v != getattr(sc, a)])})
                 for sc in scenes]
        pairwise = float((true.dims[a] > judge.score(images, wrong).dims[a]).float().mean())
        scores = torch.stack([judge.score(images, [caption_of(**{**sc.__dict__, a: v}) for sc in scenes]).dims[a]
                              for v in pool[a]], dim=1)
        truth = torch.tensor([pool[a].index(getattr(sc, a)) for sc in scenes])
        top1 = float((scores.argmax(1) == truth).float().mean())
        out[a] = {"pairwise_accuracy": round(pairwise, 4), "top1_accuracy": round(top1, 4)}
    return out


def save_judge(judge, base: Path, out: str | Path, *, named_at: str | Path | None = None) -> dict:
    """Keep the judge in ``out``: ``base/`` (the files of the base model that loading reads: config,
    tokenizer, processor, chat template -- its weights are in the checkpoint), ``model/`` (the
    stage-1 checkpoint, :meth:`~multitap_rl.MultiTapModel.save_pretrained`, naming ``base/`` as its
    base model) and ``heads/`` (the stage-2 heads). ``named_at``: where ``out`` will be when used
    (default ``out``; a caller that writes into a staging folder and moves it passes the final
    place), so the checkpoint's ``base_model`` and the heads' names are final absolute paths.
    Returns those three paths (as they will be)."""
    import fnmatch
    import shutil

    from ..checkpoint import BASE_MODEL_FILES
    from ..heads import RidgeHeads

    out = Path(out)
    final = Path(named_at if named_at is not None else out).expanduser().resolve()
    paths = {"model": str(final / "model"), "heads": str(final / "heads"), "base": str(final / "base")}
    (out / "base").mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(base).iterdir()):
        if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in BASE_MODEL_FILES) \
                and not f.name.endswith(".safetensors.index.json"):  # its shards are not kept
            shutil.copy2(f, out / "base" / f.name)
    judge.save_pretrained(out / "model", extra_metadata={"base_model": paths["base"]})
    h = judge.heads
    fingerprint = {**h.fingerprint, "checkpoint_name": paths["model"], "base_model": paths["base"]}
    RidgeHeads(h.names, h.coef, h.intercept, fingerprint=fingerprint, stats=h.stats, meta=h.meta).save(out / "heads")
    return paths
