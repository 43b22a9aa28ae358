"""Fine-tune a text-to-image diffusion model by reward backpropagation (AlignProp, TRL's
AlignPropTrainer) through a differentiable MULTI-TAP reward.

The reward is ``reward_fns.differentiable_reward``: the decoded image's pixels are rounded,
resized and normalised in torch with the same numbers as the ordinary scoring path, so the
gradient of the MULTI-TAP score flows back through the VAE decoder into the UNet's LoRA.

Needs trl<=0.22.2 (the ``ddpo`` extra, in its own virtualenv; see ``ddpo_t2i.py`` next to this
file, whose helpers it shares). Real models (hub + GPU)::

    accelerate launch examples/alignprop_t2i.py \
        --pretrained-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --checkpoint brl-xfact/Multi-TAP-Qwen2-VL-2B --epochs 20

Offline smoke run (tiny random models, CPU, seconds)::

    OMP_NUM_THREADS=1 python examples/alignprop_t2i.py --tiny --epochs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpo_t2i import RecordingReward, _prompts, run_trainer, tiny_models  # noqa: E402

logger = logging.getLogger("alignprop_t2i")

DEFAULTS = {"sample_steps": 50, "batch_size": 2, "learning_rate": 1e-3, "backprop_steps": 1}
TINY_DEFAULTS = {"sample_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "backprop_steps": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="offline: tiny random diffusion pipeline and reward model")
    p.add_argument("--pretrained-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    p.add_argument("--checkpoint", default="brl-xfact/Multi-TAP-Qwen2-VL-2B", help="MULTI-TAP checkpoint")
    p.add_argument("--base-model", default=None)
    p.add_argument("--heads", default=None, help="stage-2 heads directory (for dimension weights)")
    p.add_argument("--weights", default=None, help='e.g. "overall=1,clarity=0.5"')
    p.add_argument("--normalize", default="none", choices=["none", "fixed", "running"])
    p.add_argument("--gate", action="append", default=[], help='e.g. "safety<0.5:cap=0" (repeatable)')
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 50; --tiny 4)")
    p.add_argument("--batch-size", type=int, default=None, help="default 2")
    p.add_argument("--backprop-steps", type=int, default=None,
                   help="backpropagate through the last K denoising steps (truncated backprop; default 1)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--learning-rate", type=float, default=None, help="default 1e-3; --tiny 1e-2")
    p.add_argument("--full-unet", action="store_true", help="train the whole UNet instead of LoRA")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.backprop_steps <= args.sample_steps:
        p.error(f"--backprop-steps must be in [1, --sample-steps={args.sample_steps}]")
    return args


def build(args, workdir: str | Path, reward_fn=None):
    """(trainer, sd_pipeline, recording reward). ``reward_fn`` overrides the MULTI-TAP reward."""
    import torch
    from accelerate import PartialState

    PartialState()
    try:
        from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline
    except ImportError:
        raise ImportError("AlignPropTrainer needs trl<=0.22.2: pip install 'multitap-rl[ddpo]' "
                          "(in its own virtualenv; it conflicts with the 'trl' extra)") from None

    from reward_fns.differentiable import differentiable_reward

    workdir = Path(workdir)
    if args.tiny:
        sd_model, checkpoint, base_model = tiny_models(workdir)
    else:
        sd_model, checkpoint, base_model = args.pretrained_model, args.checkpoint, args.base_model
    sd_pipeline = DefaultDDPOStableDiffusionPipeline(sd_model, use_lora=not args.full_unet)
    if reward_fn is None:
        reward_fn = differentiable_reward(checkpoint, base_model=base_model, heads=args.heads, weights=args.weights,
                                          normalize=args.normalize, gates=args.gate)
    reward = RecordingReward(reward_fn)
    prompts = _prompts(args)
    rng = random.Random(args.seed)

    def prompt_fn():
        return rng.choice(prompts), {}

    # Truncated backprop: gradients flow through denoising steps i >= steps - K only. The window
    # must lie inside the schedule, else no step keeps its graph and backward() fails.
    steps, k = args.sample_steps, args.backprop_steps
    mixed = args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    config = AlignPropConfig(
        num_epochs=args.epochs,
        seed=args.seed,
        mixed_precision=mixed,
        log_with=None,
        save_freq=max(args.epochs, 1) + 1,
        sample_num_steps=steps,
        sample_guidance_scale=args.guidance_scale,
        train_batch_size=args.batch_size,
        train_gradient_accumulation_steps=1,
        train_learning_rate=args.learning_rate,
        truncated_backprop_rand=False,
        truncated_backprop_timestep=steps - k,
        truncated_rand_backprop_minmax=(0, steps - 1),
        allow_tf32=False,
        project_kwargs={"project_dir": str(workdir / "alignprop-project"), "automatic_checkpoint_naming": True,
                        "total_limit": 1},
    )
    trainer = AlignPropTrainer(config, reward, prompt_fn, sd_pipeline)
    return trainer, sd_pipeline, reward


def run(args, workdir: str | Path | None = None, reward_fn=None) -> dict:
    """Train with AlignProp; return a summary (see ``ddpo_t2i.run_trainer``)."""
    return run_trainer(build, args, workdir, reward_fn, prefix="alignprop_t2i_")


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.tiny:
        torch.set_num_threads(1)
    summary = run(args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
