"""A tiny Qwen2-VL captioner learns, by GRPO against the MULTI-TAP judge, to say what it sees.

Phases (:func:`run_captioner_world`):

1. judge -- :mod:`.judge` (stage 1 + stage-2 heads), with its quality measured;
2. warm start -- the policy (the same *untrained* tiny base) learns the caption FORMAT by SFT on
   images paired with captions whose colour / shape / position are drawn independently of the
   image: held-out accuracy starts at chance (1 / number of values);
3. GRPO -- TRL ``GRPOTrainer`` against ``reward_fns.multitap_reward(judge, weights=...)``; the
   reward is the only signal that reaches the policy;
4. evaluation -- greedy captions of fixed held-out images (every colour x shape x position,
   ``eval_repeats`` times; never trained on), accuracy per attribute by string matching against
   the scene -- never by the reward model -- before, every ``eval_every`` steps, and after.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, require_all
from .shapes_world import (
    ATTRIBUTES,
    accuracy,
    balanced_scenes,
    caption_of,
    draw,
    make_pool,
    random_scenes,
)

EOS = "<|im_end|>"

# The optional packages the world trains with (stage 1 under accelerate; TRL's GRPO on datasets),
# each with the extra of multitap-rl that brings it; checked before any work.
REQUIREMENTS = (("trl", "trl"), ("accelerate", "trl"), ("datasets", "trl"))


@dataclass
class CaptionerWorldConfig:
    """Settings of the world; the defaults are the measured ones (see the README)."""

    seed: int = 0
    weights: str = "color=1"
    steering: tuple[str, ...] = ()  # one GRPO run per weighting (the default run's weights reused)
    # each weighting also trained with per-dimension rewards under TRL's normalize_then_sum
    multi_objective: tuple[str, ...] = ()
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    positions: tuple[str, ...] = ("left", "top", "center")
    image_size: int = 56  # 4 image tokens
    prompt: str = "Describe this image."
    # judge
    judge_color_steps: int = 300
    judge_steps: int = 900
    judge_attributes: tuple[str, ...] = ("color", "position")
    judge_lr: float = 1e-3
    judge_n_train: int = 512
    malformed: float = 0.3
    heads_n: int = 1024
    # warm start
    warm_steps: int = 300
    warm_batch_size: int = 16
    warm_lr: float = 2e-3
    # GRPO
    grpo_steps: int = 300
    batch_size: int = 64  # completions per step
    num_generations: int = 4
    learning_rate: float = 1e-3
    beta: float = 0.3  # KL to the warm-started policy
    min_p: float = 0.1
    max_completion_length: int = 8
    n_train_images: int = 1024
    # evaluation
    eval_repeats: int = 3
    eval_every: int = 50
    n_sheet: int = 12

    def __post_init__(self):
        self.pool = make_pool(self.colors, self.shapes, self.positions)
        check_seed(self.seed, "seed")
        for name in ("judge_color_steps", "heads_n", "warm_batch_size", "batch_size", "num_generations",
                     "max_completion_length", "n_train_images", "eval_repeats", "image_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("judge_steps", "warm_steps", "grpo_steps", "eval_every", "n_sheet"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.batch_size % self.num_generations:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                              f"({self.num_generations})")
        if not _is_real(self.malformed) or not 0.0 <= self.malformed < 1.0:
            raise ConfigError(f"malformed must lie in [0, 1), got {self.malformed!r}")
        for name in ("judge_lr", "warm_lr", "learning_rate"):
            if not _is_real(getattr(self, name)) or not 0.0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not _is_real(self.beta) or not 0.0 <= self.beta < math.inf:
            raise ConfigError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"min_p must lie in [0, 1), got {self.min_p!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"prompt must be a non-empty string, got {self.prompt!r}")
        for name in ("steering", "multi_objective"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(w, str) for w in value):
                raise ConfigError(f"{name} must be a tuple of strings, got {value!r}")
        if not isinstance(self.weights, str):
            raise ConfigError(f"weights must be a string, got {self.weights!r}")
        if any(a not in ATTRIBUTES for a in self.judge_attributes) or not self.judge_attributes:
            raise ConfigError(f"judge_attributes must be names from {ATTRIBUTES}, got {self.judge_attributes}")
        for w in (self.weights, *self.steering, *self.multi_objective):
            steering_target(w)  # every weighting parses and names known dimensions, before any training

    def runs(self) -> list[tuple[str, str]]:
        """The (weighting, aggregation) pairs to train, each once: the default run's, the steering
        ones, then each multi-objective weighting as one weighted reward ("sum") and as one
        reward per dimension under TRL's "normalize_then_sum"."""
        out = [(str(parse_weights(w)), "sum") for w in (self.weights, *self.steering, *self.multi_objective)]
        out += [(str(parse_weights(w)), "normalize_then_sum") for w in self.multi_objective]
        return list(dict.fromkeys(out))


DIMENSIONS = ("overall", *ATTRIBUTES)
_MAX_SEED = 2**32 - 1  # numpy's seeds (transformers' set_seed, under GRPO) are 32-bit


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` if it is an int in [0, 2**32 - 1] (every seeded library takes it), else a ``ConfigError``."""
    if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
        raise ConfigError(f"{name} must be an int in [0, {_MAX_SEED}], got {seed!r}")
    return seed


def parse_weights(spec: str):
    from ..combiner import Weights

    w = Weights.parse(spec)
    w.check(DIMENSIONS)
    return w


def steering_target(spec: str) -> str | None:
    """The attribute a weighting steers towards: its single largest positive weight among the
    head dimensions, or ``None`` when it has none or a tie."""
    w = parse_weights(spec).as_dict()
    best = max((w.get(a, 0.0) for a in ATTRIBUTES), default=0.0)
    top = [a for a in ATTRIBUTES if w.get(a, 0.0) == best and best > 0]
    return top[0] if len(top) == 1 else None


# ---------------------------------------------------------------------------------------------
# policy
# ---------------------------------------------------------------------------------------------
def load_policy(base: Path):
    """The untrained tiny base as a captioner, with its image-only processor."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from ..backbones.qwen2_vl import _use_linear_patch_embed, image_only_processor

    policy = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    _use_linear_patch_embed(policy.model.visual.patch_embed)  # the Conv3d as the matmul it is: ~7x on CPU
    return policy, image_only_processor(str(base))


def _prompt_text(processor, prompt: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def warm_start(policy, processor, cfg: CaptionerWorldConfig, progress: bool = False) -> dict:
    """SFT on (image, caption) with the caption's attributes drawn independently of the image:
    the policy learns the format and says each value about equally often, whatever it sees."""
    import torch
    from tqdm.auto import tqdm

    rng = random.Random(cfg.seed * 7919 + 3)
    head = _prompt_text(processor, cfg.prompt)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.warm_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, cfg.warm_steps))
    n_prompt = None
    policy.train()
    losses = []
    for _ in tqdm(range(cfg.warm_steps), desc="warm start (format)", disable=not progress, leave=False):
        images = draw(random_scenes(rng, cfg.warm_batch_size, cfg.pool), cfg.image_size, rng)
        captions = [caption_of(*(rng.choice(cfg.pool[a]) for a in ATTRIBUTES)) for _ in images]
        enc = processor(text=[head + c + EOS for c in captions], images=images, return_tensors="pt", padding=True)
        if n_prompt is None:
            n_prompt = len(processor(text=[head], images=images[:1], return_tensors="pt")["input_ids"][0])
        labels = enc["input_ids"].clone()
        labels[:, :n_prompt] = -100
        labels[enc["attention_mask"] == 0] = -100
        loss = policy(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    policy.eval()
    k = max(1, len(losses) // 10)
    return {"loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4)} \
        if losses else {}


def greedy_captions(policy, processor, images, prompt: str, batch_size: int = 64, max_new_tokens: int = 10):
    """Greedy captions; the image token suppressed, as TRL samples (a generated one would break
    the image features)."""
    import torch

    head = _prompt_text(processor, prompt)
    tok = processor.tokenizer
    out = []
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            enc = processor(text=[head] * len(chunk), images=chunk, return_tensors="pt", padding=True)
            gen = policy.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids(EOS),
                                  suppress_tokens=[policy.config.image_token_id])
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    policy.train(was_training)
    return [t.strip() for t in out]


def run_grpo(policy, processor, judge, weights: str, train_images, cfg: CaptionerWorldConfig, out_dir: str,
             evaluate=None, progress: bool = False, aggregation: str = "sum") -> dict:
    """GRPO with TRL against the judge's reward; ``evaluate()`` every ``cfg.eval_every`` steps.

    ``aggregation="sum"``: one callable, ``multitap_reward(judge, weights)`` (the weighted sum);
    ``"normalize_then_sum"``: ``multitap_objective_rewards(judge, dims)`` for the weighted
    dimensions, with TRL's ``reward_weights`` and ``multi_objective_aggregation`` (each dimension
    normalised within its GRPO group before the weighted sum, as GDPO). Returns the per-step mean
    rewards, the dimensions' last means and the evaluation curve."""
    import trl
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    from reward_fns import captioning_dataset, multitap_objective_rewards, multitap_reward

    if aggregation == "sum":
        reward_funcs, extra = multitap_reward(judge, weights=weights), {}
    elif aggregation == "normalize_then_sum":
        w = {k: v for k, v in parse_weights(weights).as_dict().items() if v != 0}
        reward_funcs = multitap_objective_rewards(judge, dims=list(w))
        extra = {"reward_weights": list(w.values()), "multi_objective_aggregation": "normalize_then_sum"}
    else:
        raise ConfigError(f"aggregation must be 'sum' or 'normalize_then_sum', got {aggregation!r}")

    args = trl.GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=cfg.batch_size, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, max_steps=cfg.grpo_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        beta=cfg.beta, temperature=1.0, min_p=cfg.min_p, loss_type="dapo", scale_rewards="group",
        gradient_checkpointing=False, bf16=False, use_cpu=True,  # GRPOConfig defaults both to True
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=not progress, seed=cfg.seed, **extra,
    )
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=args,
                              train_dataset=captioning_dataset(train_images, prompt=cfg.prompt),
                              processing_class=processor)
    trainer.remove_callback(PrinterCallback)
    if progress:  # the bar without a dict of metrics printed under it every step
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(type("BarOnly", (ProgressCallback,), {"on_log": lambda *a, **k: None}))
    if trainer.ref_model is not None:
        # TRL builds the KL reference from the policy's ``name_or_path`` (the untrained base):
        # make it the warm-started policy.
        from ..backbones.qwen2_vl import _use_linear_patch_embed

        trainer.ref_model.load_state_dict(policy.state_dict())
        _use_linear_patch_embed(trainer.ref_model.model.visual.patch_embed)
    curve = []

    class _EvalEvery(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            if evaluate and cfg.eval_every and state.global_step % cfg.eval_every == 0 \
                    and state.global_step < cfg.grpo_steps:
                curve.append({"step": state.global_step, **evaluate()})
                policy.train()

    trainer.add_callback(_EvalEvery())
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    logged = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [round(float(h["reward"]), 4) for h in logged]
    k = max(1, len(rewards) // 10)
    return {"steps": len(rewards), "seconds": round(seconds, 1), "rewards": rewards,
            "reward": {"first": round(sum(rewards[:k]) / k, 4), "last": round(sum(rewards[-k:]) / k, 4)},
            "curve": curve}


# ---------------------------------------------------------------------------------------------
# the whole world
# ---------------------------------------------------------------------------------------------
def run_captioner_world(cfg: CaptionerWorldConfig, work_dir: str | Path, *, progress: bool = False,
                        log=print, keep_judge: str | Path | None = None,
                        keep_judge_as: str | Path | None = None) -> tuple[dict, list]:
    """Judge, then one warm start + GRPO per weighting in ``cfg.runs()``. Returns the report (see
    ``multitap-rl demo``; each run also holds ``samples``: held-out captions before/after) and the
    held-out images of those samples. ``work_dir`` holds the models (a temporary folder is fine).
    ``keep_judge``: a folder the judge is saved in as soon as it is trained (``base/``, ``model/``,
    ``heads/``: :func:`.judge.save_judge`; ``keep_judge_as``: where that folder will be when
    used); the report's ``judge`` then holds those paths under ``saved``."""
    import torch

    from .judge import judge_quality, load_judge, save_judge, train_judge

    require_all(REQUIREMENTS, "the captioner world")

    work = Path(work_dir)
    seconds = {"judge": 0.0, "warm": 0.0, "grpo": 0.0, "eval": 0.0}
    t_all = time.perf_counter()

    def timed(phase, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        seconds[phase] = round(seconds[phase] + time.perf_counter() - t, 1)
        return out

    torch.manual_seed(cfg.seed)
    log(f"[1/4] judge: tiny Qwen2-VL, stage 1 ({cfg.judge_color_steps} + {cfg.judge_steps} steps) ...")
    base, model_dir, metrics = timed("judge", train_judge, work, cfg, cfg.pool, progress)
    judge = timed("judge", load_judge, base, model_dir, cfg, cfg.pool)
    heads = timed("judge", judge_quality, judge, cfg, cfg.pool)
    report: dict = {"seed": cfg.seed,
                    "judge": {"val_mse": round(metrics["mse"], 6), "baseline_mse": round(metrics["baseline_mse"], 6),
                              "heads": heads}}
    log(f"      validation MSE {metrics['mse']:.4f} vs {metrics['baseline_mse']:.4f} (constant predictor); "
        "heads' held-out pairwise accuracy: "
        + ", ".join(f"{a} {h['pairwise_accuracy']:.2f}" for a, h in heads.items()) + f"  ({seconds['judge']:.0f}s)")
    if keep_judge is not None:
        report["judge"]["saved"] = save_judge(judge, base, keep_judge, named_at=keep_judge_as)

    rng = random.Random(10_000 + cfg.seed)
    eval_scenes = balanced_scenes(cfg.pool, cfg.eval_repeats)
    eval_images = draw(eval_scenes, cfg.image_size, rng)
    rng = random.Random(20_000 + cfg.seed)
    train_images = draw(random_scenes(rng, cfg.n_train_images, cfg.pool), cfg.image_size, rng)
    sheet = random.Random(cfg.seed).sample(range(len(eval_scenes)), min(cfg.n_sheet, len(eval_scenes)))

    def evaluate(policy, processor, keep=False):
        caps = greedy_captions(policy, processor, eval_images, cfg.prompt)
        acc = accuracy(caps, eval_scenes, cfg.pool)
        return (acc, [caps[i] for i in sheet]) if keep else acc

    runs = []
    for weights, aggregation in cfg.runs():
        run: dict = {"weights": weights, "aggregation": aggregation, "target": steering_target(weights)}
        name = weights if aggregation == "sum" else f"{weights}, {aggregation}"
        torch.manual_seed(cfg.seed)
        policy, processor = load_policy(base)  # the untrained base, fresh for every run
        log(f"[2/4] captioner ({name}): warm start on the caption format, attributes drawn at random ...")
        run["warm"] = timed("warm", warm_start, policy, processor, cfg, progress)
        before, before_caps = timed("eval", evaluate, policy, processor, True)
        log(f"[3/4] captioner ({name}): GRPO, {cfg.grpo_steps} steps against the judge's weighted reward ...")
        grpo = timed("grpo", run_grpo, policy, processor, judge, weights, train_images, cfg, str(work / "grpo"),
                     evaluate=lambda p=policy, pr=processor: evaluate(p, pr), progress=progress,
                     aggregation=aggregation)
        after, after_caps = timed("eval", evaluate, policy, processor, True)
        run.update(steps=grpo["steps"], seconds=grpo["seconds"], reward=grpo["reward"], rewards=grpo["rewards"],
                   heldout={a: {"before": before[a], "after": after[a]} for a in (*ATTRIBUTES, "format")},
                   curve=[{"step": 0, **before}, *grpo["curve"], {"step": grpo["steps"], **after}],
                   samples=[{"truth": caption_of(eval_scenes[i].color, eval_scenes[i].shape, eval_scenes[i].position),
                             "scene": {a: getattr(eval_scenes[i], a) for a in ATTRIBUTES}, "before": b, "after": a}
                            for i, b, a in zip(sheet, before_caps, after_caps)])
        log(f"[4/4] held-out accuracy ({name}): "
            + ", ".join(f"{a} {before[a]:.2f} -> {after[a]:.2f}" for a in ATTRIBUTES))
        runs.append(run)
        del policy
    report["captioner"] = runs[0]
    by_run = {(r["weights"], r["aggregation"]): r for r in runs}
    if cfg.steering:
        report["steering"] = [by_run[(str(parse_weights(w)), "sum")] for w in cfg.steering]
    if cfg.multi_objective:  # every run, the single-dimension ones beside the combined ones, for comparison
        report["multi_objective"] = [{"weights": r["weights"], "aggregation": r["aggregation"],
                                      "heldout": {a: dict(r["heldout"][a]) for a in ATTRIBUTES}} for r in runs]
        shown = [report["captioner"], *report.get("steering", [])]
        report["combined"] = [r for r in runs if all(r is not s for s in shown)]  # the multi-objective runs in full
    seconds["total"] = round(time.perf_counter() - t_all, 1)
    report["seconds"] = seconds
    report["config"] = dataclasses.asdict(cfg)
    return report, [eval_images[i] for i in sheet]


def check_targets(report: dict) -> dict:
    """The targets, checked on a report: the default colour run (colour after >= 0.5, gain >= 0.25),
    each steering run (target gain >= 0.2 and >= 0.15 above any other attribute), and for each
    multi-objective weighting, whether some aggregation raised every weighted attribute by >= 0.2."""
    out = {}

    def gain(run, a):
        return run["heldout"][a]["after"] - run["heldout"][a]["before"]

    cap = report["captioner"]
    if cap["target"] == "color":
        out["captioner"] = cap["heldout"]["color"]["after"] >= 0.5 and gain(cap, "color") >= 0.25
    for run in report.get("steering", []):
        t = run["target"]
        if t is None:
            continue
        others = max(gain(run, a) for a in ATTRIBUTES if a != t)
        out[run["weights"]] = gain(run, t) >= 0.2 and gain(run, t) - others >= 0.15
    for run in report.get("multi_objective", []):
        weighted = [a for a, w in parse_weights(run["weights"]).as_dict().items() if a in ATTRIBUTES and w > 0]
        if len(weighted) > 1:
            key = f"{run['weights']}: every weighted attribute +0.2 under some aggregation"
            out[key] = out.get(key, False) or all(gain(run, a) >= 0.2 for a in weighted)
    return out
