"""Fine-tune a text-to-image diffusion model with DDPO (TRL's DDPOTrainer) against MULTI-TAP.

TRL removed ``DDPOTrainer`` after 0.22.2, so this runs in its own virtualenv (it conflicts with
the ``trl`` extra used by the GRPO example)::

    python -m venv .venv-ddpo && . .venv-ddpo/bin/activate
    pip install torch==2.13.0 && pip install -e ".[ddpo]"

Real models (needs the hub and a GPU; LoRA on the UNet, the reward model loaded once on the same
GPU in bf16)::

    accelerate launch examples/ddpo_t2i.py \
        --pretrained-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --checkpoint brl-xfact/Multi-TAP-Qwen2-VL-2B --weights "overall=1" --epochs 100

Offline, on CPU (``--tiny``): the colour world of ``multitap_rl.world.t2i`` -- a tiny seeded
Stable Diffusion pipeline, prompts naming a colour, a tiny MULTI-TAP judge trained here with stage
1 -- with the oracle (dominant pixel colour == the prompt's colour, on held-out prompt templates
and fixed seeds) measured before and after training; ``--output-dir D`` gets ``D/report.json``,
``D/grid.png`` and ``D/reward_curve.png``::

    OMP_NUM_THREADS=1 python examples/ddpo_t2i.py --tiny --output-dir runs/ddpo-tiny
    OMP_NUM_THREADS=1 python examples/ddpo_t2i.py --tiny --epochs 2     # smoke run

The reward is ``reward_fns.ddpo_reward``: the prompt is scored as the caption of the generated
image (MULTI-TAP's text-to-image layout), ``--weights`` combine ``overall`` with stage-2
dimensions when ``--heads`` are given, and every dimension reaches the trainer in ``info``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("ddpo_t2i")

DEFAULT_PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a red bicycle leaning against a brick wall",
    "two dogs playing in the snow",
    "a bowl of fruit on a wooden table",
    "a lighthouse on a cliff at sunset",
    "a child flying a kite on the beach",
]


# --tiny: the settings measured in the colour world (README, "Text-to-image RL").
DEFAULTS = {"epochs": 100, "sample_steps": 50, "batch_size": 4, "batches_per_epoch": 2, "learning_rate": 3e-4,
            "clip_range": 1e-4, "reward_transform": "none"}
TINY_DEFAULTS = {"epochs": 300, "sample_steps": 4, "batch_size": 32, "batches_per_epoch": 2, "learning_rate": 3e-3,
                 "clip_range": 0.2, "reward_transform": "none"}


def add_model_arguments(p: argparse.ArgumentParser, policy: str = "random") -> None:
    """The options of every text-to-image example: the offline world (``--tiny``; ``policy``: its
    default tiny SD), or the diffusion model and the MULTI-TAP reward's settings."""
    p.add_argument("--tiny", action="store_true",
                   help="offline colour world: tiny SD pipeline, a judge trained here, oracle before/after")
    p.add_argument("--cache-dir", default=None,
                   help="--tiny: build (or reuse) the tiny SD pipeline and judge here (default: a temp dir)")
    p.add_argument("--world-seed", type=int, default=0, help="--tiny: seeds the tiny SD pipeline and the judge")
    p.add_argument("--policy", default=policy, choices=["random", "pretrained"],
                   help=f"--tiny: the random tiny SD or one pretrained on captioned colour scenes (default {policy})")
    p.add_argument("--pretrained-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="diffusers Stable Diffusion pipeline (hub id or directory)")
    p.add_argument("--checkpoint", default="brl-xfact/Multi-TAP-Qwen2-VL-2B", help="MULTI-TAP checkpoint")
    p.add_argument("--base-model", default=None, help="base model of --checkpoint (known checkpoints: automatic)")
    p.add_argument("--heads", default=None, help="stage-2 heads directory (for dimension weights)")
    p.add_argument("--weights", default=None, help='e.g. "overall=1,clarity=0.5" or a preset name')
    p.add_argument("--normalize", default="none", choices=["none", "fixed", "running"])
    p.add_argument("--gate", action="append", default=[], help='e.g. "safety<0.5:cap=0" (repeatable)')


def add_common_arguments(p: argparse.ArgumentParser, defaults: dict, tiny_defaults: dict) -> None:
    """The options the DDPO and AlignProp examples share (``defaults`` fill the ``None`` ones)."""

    def dflt(key):
        return f"default {defaults[key]}; --tiny {tiny_defaults[key]}"

    add_model_arguments(p)
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    p.add_argument("--epochs", type=int, default=None, help=dflt("epochs"))
    p.add_argument("--sample-steps", type=int, default=None, help=f"DDIM steps per sample ({dflt('sample_steps')})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per batch, sampling and training ({dflt('batch_size')})")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--learning-rate", type=float, default=None, help=dflt("learning_rate"))
    p.add_argument("--full-unet", action="store_true", help="train the whole UNet instead of LoRA")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: bf16 on GPU, no on CPU")
    p.add_argument("--reward-transform", default=None, choices=["none", "log"],
                   help=f"hand the trainer log(reward) instead (same ranking) ({dflt('reward_transform')})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None,
                   help="save the trained pipeline (LoRA weights) here; --tiny: also report.json and the plots")


def fill_defaults(args, defaults: dict, tiny_defaults: dict):
    for key, value in (tiny_defaults if args.tiny else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, DEFAULTS, TINY_DEFAULTS)
    p.add_argument("--batches-per-epoch", type=int, default=None, help="default 2; --tiny 2")
    p.add_argument("--clip-range", type=float, default=None, help="PPO clip range (default 1e-4, TRL's; --tiny 0.2)")
    p.add_argument("--per-prompt-stat-tracking", action="store_true",
                   help="normalise each prompt's rewards by its own running mean/std (TRL's tracker)")
    return fill_defaults(p.parse_args(argv), DEFAULTS, TINY_DEFAULTS)


class RecordingReward:
    """Wraps a reward function; keeps per-call statistics (reward mean, image range) for logging
    (to ``log``, the running example's logger). ``transform="log"`` hands the trainer
    ``log(reward)`` (monotone: the same ranking; for reward backpropagation through a sigmoid score
    it undoes the saturation, d log(sigmoid(s))/ds = 1 - sigmoid(s)); the recorded means are the
    untransformed reward."""

    def __init__(self, reward_fn, transform: str = "none", log: logging.Logger = logger):
        self.reward_fn, self.transform, self.log = reward_fn, transform, log
        self.__name__ = getattr(reward_fn, "__name__", "reward")
        self.calls: list[dict] = []
        self.seconds = 0.0

    def __call__(self, images, prompts, metadata):
        t = time.perf_counter()
        rewards, info = self.reward_fn(images, prompts, metadata)
        self.seconds += time.perf_counter() - t
        self.calls.append({"n": len(prompts), "reward_mean": float(rewards.detach().float().mean()),
                           "image_min": float(images.detach().min()), "image_max": float(images.detach().max()),
                           "image_shape": list(images.shape), "dims": sorted(info)})
        self.log.info("reward batch %d: mean %.4f (%s)", len(self.calls), self.calls[-1]["reward_mean"],
                    ", ".join(f"{k}={float(v.float().mean()):.3f}" for k, v in info.items() if k != "gated"))
        if self.transform == "log":
            rewards = rewards.clamp_min(1e-6).log()
        return rewards, info


def tiny_world(args, workdir: Path) -> dict:
    """The colour world's tiny SD pipeline and judge (``multitap_rl.world.t2i.build_world``), in
    ``--cache-dir`` or under ``workdir``; every build is seeded by ``--world-seed``."""
    from multitap_rl.world import t2i

    return t2i.build_world(Path(args.cache_dir) if args.cache_dir else workdir / "world", seed=args.world_seed,
                           policy=args.policy)


def read_prompts(args) -> list[str]:
    """``--prompts``' lines (non-empty), or the default prompts."""
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts")
        return prompts
    return list(DEFAULT_PROMPTS)


def import_trl(*names: str):
    """``names`` from trl, or an ImportError saying which trl and extra they need. Creates
    accelerate's state first: TRL's DDPO logging needs it before a trainer exists."""
    import importlib

    from accelerate import PartialState

    PartialState()
    try:
        trl = importlib.import_module("trl")
        return tuple(getattr(trl, n) for n in names)
    except (ImportError, AttributeError):
        raise ImportError(f"{names[-1]} needs trl<=0.22.2: pip install 'multitap-rl[ddpo]' "
                          "(in its own virtualenv; it conflicts with the 'trl' extra)") from None


def prepare(args, workdir: Path, make_reward, reward_fn=None, log: logging.Logger = logger):
    """Shared by the DDPO and AlignProp examples: (sd_pipeline, recording reward, prompt_fn,
    mixed precision). ``make_reward(checkpoint, base_model=..., heads=..., weights=..., ...)``
    builds the MULTI-TAP reward unless ``reward_fn`` is given; the reward logs to ``log``."""
    import torch

    (DefaultDDPOStableDiffusionPipeline,) = import_trl("DefaultDDPOStableDiffusionPipeline")
    # 1. Models: the offline colour world, or the given hub ids / directories.
    if args.tiny:
        args.world = tiny_world(args, workdir)
        sd_model, checkpoint, base_model = args.world["sd"], args.world["judge"], None
    else:
        sd_model, checkpoint, base_model = args.pretrained_model, args.checkpoint, args.base_model
    sd_pipeline = DefaultDDPOStableDiffusionPipeline(sd_model, use_lora=not args.full_unet)
    if reward_fn is None:
        reward_fn = make_reward(checkpoint, base_model=base_model, heads=args.heads, weights=args.weights,
                                normalize=args.normalize, gates=args.gate)

    # 2. Prompts (DDPO's prompt_fn returns (prompt, metadata)): --tiny, the world's training
    # templates with the colours in turn; else one drawn at random per sample.
    if args.tiny and not args.prompts:
        from multitap_rl.world import t2i

        prompt_fn = t2i.prompt_fn(args.seed)
    else:
        prompts = read_prompts(args)
        rng = random.Random(args.seed)

        def prompt_fn():
            return rng.choice(prompts), {}

    # CPU needs mixed_precision="no".
    mixed = args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    return sd_pipeline, RecordingReward(reward_fn, args.reward_transform, log), prompt_fn, mixed


def build(args, workdir: str | Path, reward_fn=None):
    """(trainer, sd_pipeline, recording reward). ``reward_fn`` overrides the MULTI-TAP reward."""
    DDPOConfig, DDPOTrainer = import_trl("DDPOConfig", "DDPOTrainer")
    from reward_fns.ddpo import ddpo_reward

    workdir = Path(workdir)
    sd_pipeline, reward, prompt_fn, mixed = prepare(args, workdir, ddpo_reward, reward_fn)
    # A fresh project_dir per run (accelerate's automatic checkpoint naming refuses to reuse one).
    config = DDPOConfig(
        num_epochs=args.epochs,
        seed=args.seed,
        mixed_precision=mixed,
        log_with=None,
        save_freq=max(args.epochs, 1) + 1,  # save once at the end ourselves
        sample_num_steps=args.sample_steps,
        sample_batch_size=args.batch_size,
        sample_num_batches_per_epoch=args.batches_per_epoch,
        sample_guidance_scale=args.guidance_scale,
        train_batch_size=args.batch_size,
        train_gradient_accumulation_steps=1,
        train_learning_rate=args.learning_rate,
        train_clip_range=args.clip_range,
        train_timestep_fraction=1.0,
        per_prompt_stat_tracking=args.per_prompt_stat_tracking,
        allow_tf32=False,
        project_kwargs={"project_dir": str(workdir / "ddpo-project"), "automatic_checkpoint_naming": True,
                        "total_limit": 1},
    )
    trainer = DDPOTrainer(config, reward, prompt_fn, sd_pipeline)
    return trainer, sd_pipeline, reward


def _evaluate(args, sd_pipeline) -> dict:
    """--tiny: the oracle on the held-out prompts and fixed seeds, sampled as in training."""
    from multitap_rl.world import t2i

    sd_pipeline.sd_pipeline.set_progress_bar_config(disable=True)
    return t2i.evaluate(sd_pipeline.sd_pipeline, steps=args.sample_steps, guidance=args.guidance_scale, eta=1.0)


def write_report(args, out_dir: Path, name: str, before: dict, after: dict, reward: RecordingReward,
                 seconds: dict) -> dict:
    """--tiny: ``report.json`` (oracle before/after, judge reward over the first/last calls, the
    settings, timings), ``grid.png`` (held-out samples before/after) and ``reward_curve.png``."""
    from multitap_rl.world import t2i

    out_dir.mkdir(parents=True, exist_ok=True)
    means = [c["reward_mean"] for c in reward.calls]
    skip = ("world", "output_dir", "cache_dir", "pretrained_model", "checkpoint", "base_model")
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    report = {
        "oracle": {"before": before["accuracy"], "after": after["accuracy"]},
        "reward": windowed(means),  # means over the first / last tenth of the calls
        "oracle_strict": {"before": before["strict"], "after": after["strict"]},
        "prompt_colour_pixel_share": {"before": before["share"], "after": after["share"]},
        "confusion": {"before": before["confusion"], "after": after["confusion"]},  # prompt -> dominant colour
        "n_eval": len(after["colors"]),
        "reward_calls": len(means),
        "method": name,
        "config": settings,
        "judge": {k: args.world["judge_summary"][k] for k in ("steps", "n_train", "metrics")},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    n = 16  # the first 4 held-out templates x 4 colours, first eval seed
    t2i.save_grid(out_dir / "grid.png", before["images"][:n], after["images"][:n], after["colors"][:n])
    t2i.save_curve(out_dir / "reward_curve.png", means, f"{name} seed {args.seed}: mean judge reward per call")
    return report


def run_trainer(build_fn, args, workdir: str | Path | None = None, reward_fn=None, prefix: str = "t2i_") -> dict:
    """Build with ``build_fn``, train; return a summary (per-call reward means, image range,
    trainable parameters changed; --tiny: the oracle before/after too, and with --output-dir the
    report and plots of :func:`write_report`). Shared by the DDPO and AlignProp examples; logs
    under the example's own name (``prefix`` without its trailing ``_``)."""
    import torch

    log = logging.getLogger(prefix.strip("_"))
    seconds: dict[str, float] = {}
    evals: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        t = time.perf_counter()
        trainer, sd_pipeline, reward = build_fn(args, workdir or tmp, reward_fn=reward_fn)
        seconds["build"] = time.perf_counter() - t
        if args.tiny:
            seconds.update(args.world["seconds"])
            t = time.perf_counter()
            evals["before"] = _evaluate(args, sd_pipeline)
            seconds["eval_before"] = time.perf_counter() - t
        trainable = {n: p.detach().clone() for n, p in sd_pipeline.unet.named_parameters() if p.requires_grad}
        t = time.perf_counter()
        trainer.train()
        seconds["train"] = time.perf_counter() - t
        seconds["train_reward_calls"] = reward.seconds
        if args.tiny:
            t = time.perf_counter()
            evals["after"] = _evaluate(args, sd_pipeline)
            seconds["eval_after"] = time.perf_counter() - t
        after = {n: p.detach() for n, p in sd_pipeline.unet.named_parameters() if n in trainable}
        changed = sum(not torch.equal(after[n], trainable[n]) for n in trainable)
        # Zero-initialised tensors (LoRA's B) move only through gradients, never by weight decay.
        zero_init = [n for n, t in trainable.items() if not t.any()]
        moved = sum(bool(after[n].any()) for n in zero_init)
        if args.output_dir:
            sd_pipeline.save_pretrained(args.output_dir)
            log.info("saved the trained pipeline to %s", args.output_dir)
    summary = {
        "trainable_tensors": len(trainable),
        "changed_tensors": changed,
        "zero_init_tensors": len(zero_init),
        "zero_init_moved": moved,
        "reward_means": [c["reward_mean"] for c in reward.calls],
        "image_min": min(c["image_min"] for c in reward.calls),
        "image_max": max(c["image_max"] for c in reward.calls),
        "image_shape": reward.calls[-1]["image_shape"],
        "dims": reward.calls[-1]["dims"],
    }
    if args.tiny:
        summary["oracle"] = {"before": evals["before"]["accuracy"], "after": evals["after"]["accuracy"]}
        summary["reward"] = {"first": summary["reward_means"][0], "last": summary["reward_means"][-1]}
        if args.output_dir:
            report = write_report(args, Path(args.output_dir), prefix.strip("_"), evals["before"], evals["after"],
                                  reward, seconds)
            summary["report"] = str(Path(args.output_dir) / "report.json")
            summary["seconds"] = report["seconds"]
    return summary


def run(args, workdir: str | Path | None = None, reward_fn=None) -> dict:
    """Train with DDPO; return a summary (see :func:`run_trainer`)."""
    return run_trainer(build, args, workdir, reward_fn, prefix="ddpo_t2i_")


def windowed(means: list[float]) -> dict:
    """First and last reward as means over a window of calls (a tenth of them, at least one): one
    call is too noisy to say where a run started or ended."""
    k = max(1, len(means) // 10)
    return {"first": sum(means[:k]) / k, "last": sum(means[-k:]) / k, "window": k}


def short_summary(summary: dict) -> dict:
    """The summary without its per-call curve (one number per reward call: 1000 for an AlignProp
    --tiny run): the number of calls and the windowed first and last means instead. The curve is
    in the returned summary, and with --tiny --output-dir in reward_curve.png."""
    means = summary["reward_means"]
    short = {k: v for k, v in summary.items() if k != "reward_means"}
    short["reward_calls"] = len(means)
    short["reward"] = windowed(means)
    return short


def cli_main(parse, run_fn, argv=None) -> dict:
    """Parse, train, print a short summary as one JSON line (the entry point of both t2i
    examples); return the whole summary."""
    import torch

    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.tiny:
        torch.set_num_threads(1)
    summary = run_fn(args)
    print(json.dumps(short_summary(summary)))
    return summary


def main(argv=None) -> dict:
    return cli_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
