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

Offline smoke run on a tiny random Stable Diffusion pipeline and a tiny MULTI-TAP model (CPU,
seconds)::

    OMP_NUM_THREADS=1 python examples/ddpo_t2i.py --tiny --epochs 2

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


DEFAULTS = {"sample_steps": 50, "batch_size": 4, "batches_per_epoch": 2, "learning_rate": 3e-4}
TINY_DEFAULTS = {"sample_steps": 4, "batch_size": 2, "batches_per_epoch": 1, "learning_rate": 1e-2}


def add_common_arguments(p: argparse.ArgumentParser, defaults: dict, tiny_defaults: dict, epochs: int) -> None:
    """The options the DDPO and AlignProp examples share (``defaults`` fill the ``None`` ones)."""

    def dflt(key):
        return f"default {defaults[key]}; --tiny {tiny_defaults[key]}"

    p.add_argument("--tiny", action="store_true", help="offline: tiny random diffusion pipeline and reward model")
    p.add_argument("--pretrained-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="diffusers Stable Diffusion pipeline (hub id or directory)")
    p.add_argument("--checkpoint", default="brl-xfact/Multi-TAP-Qwen2-VL-2B", help="MULTI-TAP checkpoint")
    p.add_argument("--base-model", default=None, help="base model of --checkpoint (known checkpoints: automatic)")
    p.add_argument("--heads", default=None, help="stage-2 heads directory (for dimension weights)")
    p.add_argument("--weights", default=None, help='e.g. "overall=1,clarity=0.5" or a preset name')
    p.add_argument("--normalize", default="none", choices=["none", "fixed", "running"])
    p.add_argument("--gate", action="append", default=[], help='e.g. "safety<0.5:cap=0" (repeatable)')
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--sample-steps", type=int, default=None, help=f"DDIM steps per sample ({dflt('sample_steps')})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per batch, sampling and training ({dflt('batch_size')})")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--learning-rate", type=float, default=None, help=dflt("learning_rate"))
    p.add_argument("--full-unet", action="store_true", help="train the whole UNet instead of LoRA")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: bf16 on GPU, no on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="save the trained pipeline (LoRA weights) here")


def fill_defaults(args, defaults: dict, tiny_defaults: dict):
    for key, value in (tiny_defaults if args.tiny else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, DEFAULTS, TINY_DEFAULTS, epochs=100)
    p.add_argument("--batches-per-epoch", type=int, default=None, help="default 2; --tiny 1")
    return fill_defaults(p.parse_args(argv), DEFAULTS, TINY_DEFAULTS)


class RecordingReward:
    """Wraps a reward function; keeps per-call statistics (reward mean, image range) for logging."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn
        self.__name__ = getattr(reward_fn, "__name__", "reward")
        self.calls: list[dict] = []

    def __call__(self, images, prompts, metadata):
        rewards, info = self.reward_fn(images, prompts, metadata)
        self.calls.append({"n": len(prompts), "reward_mean": float(rewards.detach().float().mean()),
                           "image_min": float(images.detach().min()), "image_max": float(images.detach().max()),
                           "image_shape": list(images.shape), "dims": sorted(info)})
        logger.info("reward batch %d: mean %.4f (%s)", len(self.calls), self.calls[-1]["reward_mean"],
                    ", ".join(f"{k}={float(v.float().mean()):.3f}" for k, v in info.items() if k != "gated"))
        return rewards, info


def tiny_models(workdir: Path) -> tuple[str, str, str]:
    """(diffusion pipeline dir, MULTI-TAP checkpoint dir, base model dir), built offline."""
    from multitap_rl.testing import build_tiny_multitap, build_tiny_stable_diffusion

    sd = build_tiny_stable_diffusion(workdir / "tiny-sd", seed=0)
    base, reward = build_tiny_multitap(workdir / "tiny-multitap", seed=0)
    return str(sd), str(reward), str(base)


def _prompts(args) -> list[str]:
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts")
        return prompts
    if args.tiny:
        from multitap_rl.testing import TINY_SD_PROMPTS

        return list(TINY_SD_PROMPTS)
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


def prepare(args, workdir: Path, make_reward, reward_fn=None):
    """Shared by the DDPO and AlignProp examples: (sd_pipeline, recording reward, prompt_fn,
    mixed precision). ``make_reward(checkpoint, base_model=..., heads=..., weights=..., ...)``
    builds the MULTI-TAP reward unless ``reward_fn`` is given."""
    import torch

    (DefaultDDPOStableDiffusionPipeline,) = import_trl("DefaultDDPOStableDiffusionPipeline")
    # 1. Models: tiny offline ones, or the given hub ids / directories.
    if args.tiny:
        sd_model, checkpoint, base_model = tiny_models(workdir)
    else:
        sd_model, checkpoint, base_model = args.pretrained_model, args.checkpoint, args.base_model
    sd_pipeline = DefaultDDPOStableDiffusionPipeline(sd_model, use_lora=not args.full_unet)
    if reward_fn is None:
        reward_fn = make_reward(checkpoint, base_model=base_model, heads=args.heads, weights=args.weights,
                                normalize=args.normalize, gates=args.gate)

    # 2. Prompts: one drawn at random per sample (DDPO's prompt_fn returns (prompt, metadata)).
    prompts = _prompts(args)
    rng = random.Random(args.seed)

    def prompt_fn():
        return rng.choice(prompts), {}

    # CPU needs mixed_precision="no".
    mixed = args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    return sd_pipeline, RecordingReward(reward_fn), prompt_fn, mixed


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
        train_timestep_fraction=1.0,
        per_prompt_stat_tracking=False,
        allow_tf32=False,
        project_kwargs={"project_dir": str(workdir / "ddpo-project"), "automatic_checkpoint_naming": True,
                        "total_limit": 1},
    )
    trainer = DDPOTrainer(config, reward, prompt_fn, sd_pipeline)
    return trainer, sd_pipeline, reward


def run_trainer(build_fn, args, workdir: str | Path | None = None, reward_fn=None, prefix: str = "t2i_") -> dict:
    """Build with ``build_fn``, train; return a summary (per-call reward means, image range,
    trainable parameters changed). Shared by the DDPO and AlignProp examples."""
    import torch

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        trainer, sd_pipeline, reward = build_fn(args, workdir or tmp, reward_fn=reward_fn)
        trainable = {n: p.detach().clone() for n, p in sd_pipeline.unet.named_parameters() if p.requires_grad}
        trainer.train()
        after = {n: p.detach() for n, p in sd_pipeline.unet.named_parameters() if n in trainable}
        changed = sum(not torch.equal(after[n], trainable[n]) for n in trainable)
        # Zero-initialised tensors (LoRA's B) move only through gradients, never by weight decay.
        zero_init = [n for n, t in trainable.items() if not t.any()]
        moved = sum(bool(after[n].any()) for n in zero_init)
        if args.output_dir:
            sd_pipeline.save_pretrained(args.output_dir)
            logger.info("saved the trained pipeline to %s", args.output_dir)
    return {
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


def run(args, workdir: str | Path | None = None, reward_fn=None) -> dict:
    """Train with DDPO; return a summary (see :func:`run_trainer`)."""
    return run_trainer(build, args, workdir, reward_fn, prefix="ddpo_t2i_")


def cli_main(parse, run_fn, argv=None) -> dict:
    """Parse, train, print the summary as JSON (the entry point of both t2i examples)."""
    import torch

    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.tiny:
        torch.set_num_threads(1)
    summary = run_fn(args)
    print(json.dumps(summary))
    return summary


def main(argv=None) -> dict:
    return cli_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
