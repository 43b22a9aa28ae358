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

Offline, on CPU (``--tiny``, the colour world of ``multitap_rl.world.t2i``; see ``ddpo_t2i.py``):
``--output-dir D`` gets ``D/report.json`` (oracle before/after, judge reward first/last),
``D/grid.png`` and ``D/reward_curve.png``::

    OMP_NUM_THREADS=1 python examples/alignprop_t2i.py --tiny --output-dir runs/alignprop-tiny
    OMP_NUM_THREADS=1 python examples/alignprop_t2i.py --tiny --epochs 2     # smoke run
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpo_t2i import add_common_arguments, cli_main, fill_defaults, import_trl, prepare, run_trainer  # noqa: E402

logger = logging.getLogger("alignprop_t2i")

# --tiny: the settings measured in the colour world (README, "Text-to-image RL").
DEFAULTS = {"epochs": 20, "sample_steps": 50, "batch_size": 2, "learning_rate": 1e-3, "backprop_steps": 1,
            "reward_transform": "none"}
TINY_DEFAULTS = {"epochs": 1000, "sample_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "backprop_steps": 1,
                 "reward_transform": "log"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, DEFAULTS, TINY_DEFAULTS)
    p.add_argument("--backprop-steps", type=int, default=None,
                   help="backpropagate through the last K denoising steps (truncated backprop; default 1)")
    args = fill_defaults(p.parse_args(argv), DEFAULTS, TINY_DEFAULTS)
    if not 1 <= args.backprop_steps <= args.sample_steps:
        p.error(f"--backprop-steps must be in [1, --sample-steps={args.sample_steps}]")
    return args


def build(args, workdir: str | Path, reward_fn=None):
    """(trainer, sd_pipeline, recording reward). ``reward_fn`` overrides the MULTI-TAP reward."""
    AlignPropConfig, AlignPropTrainer = import_trl("AlignPropConfig", "AlignPropTrainer")
    from reward_fns.differentiable import differentiable_reward

    workdir = Path(workdir)
    sd_pipeline, reward, prompt_fn, mixed = prepare(args, workdir, differentiable_reward, reward_fn, log=logger)

    # Truncated backprop: gradients flow through denoising steps i >= steps - K only. The window
    # must lie inside the schedule, else no step keeps its graph and backward() fails.
    steps, k = args.sample_steps, args.backprop_steps
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
    return cli_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
