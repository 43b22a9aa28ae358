r"""Fine-tune a Qwen2-VL captioner with TRL's GRPOTrainer (or RLOOTrainer) against MULTI-TAP.

Real models (needs the hub and a GPU; the reward model is co-located with the policy, loaded once
per process on that process's GPU in bf16):

    accelerate launch examples/grpo_captioner.py \
        --policy Qwen/Qwen2-VL-2B-Instruct \
        --checkpoint brl-xfact/Multi-TAP-Qwen2-VL-2B --base-model Qwen/Qwen2-VL-2B-Instruct \
        --heads path/to/heads --weights "overall=1,clarity=0.5" --dataset my_images_dir

Many GPUs with DeepSpeed ZeRO-3 for the policy, and the reward model partitioned too:

    accelerate launch --config_file recipes/accelerate/zero3.yaml examples/grpo_captioner.py \
        --checkpoint brl-xfact/Multi-TAP-Qwen2-VL-7B --dataset my_images_dir --shard-reward

Offline smoke run on tiny random models (CPU, ~10 s; nothing is left behind unless --output-dir
is given):

    OMP_NUM_THREADS=1 python examples/grpo_captioner.py --tiny --max-steps 2

A captioner that measurably learns under the weighted reward (held-out accuracy before/after,
plots): ``multitap-rl demo``.

``--dataset``: a directory of images, a ``datasets.load_from_disk`` directory, or a hub dataset id,
with an ``image`` column.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("grpo_captioner")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="offline: tiny random policy, reward model and images")
    p.add_argument("--trainer", choices=["grpo", "rloo"], default="grpo")
    p.add_argument("--policy", default="Qwen/Qwen2-VL-2B-Instruct", help="policy VLM (hub id or directory)")
    p.add_argument("--checkpoint", default="brl-xfact/Multi-TAP-Qwen2-VL-2B", help="MULTI-TAP checkpoint")
    p.add_argument("--base-model", default=None, help="base model of --checkpoint (default: known or --policy)")
    p.add_argument("--heads", default=None, help="stage-2 heads directory (for dimension weights)")
    p.add_argument("--reward-url", default=None,
                   help="score through a served reward (multitap-rl serve; several URLs comma-separated) instead "
                        "of loading --checkpoint here; weights, normalisation and gates still apply here")
    p.add_argument("--weights", default=None, help='e.g. "overall=1,clarity=0.5" or a preset name')
    p.add_argument("--objectives", action="store_true",
                   help="one reward per dimension (TRL reward_weights) instead of one weighted reward")
    p.add_argument("--dataset", default=None, help="images: a folder, a load_from_disk dir or a hub id")
    p.add_argument("--num-images", type=int, default=8, help="--tiny: generated images")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="per-device prompts x generations per step")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--offload-reward", action="store_true", help="keep the reward model on CPU between calls")
    p.add_argument("--shard-reward", action="store_true",
                   help="partition the reward model over the ranks with DeepSpeed ZeRO-3 (gathered for each call)")
    p.add_argument("--output-dir", default=None)
    return p.parse_args(argv)


def _dataset(args):
    from datasets import load_dataset, load_from_disk

    from reward_fns.captioner import captioning_dataset

    if args.dataset is None:
        if not args.tiny:
            raise ValueError("pass --dataset (a folder of images, a load_from_disk dir or a hub id), or --tiny")
        from multitap_rl.testing import make_image

        return captioning_dataset([make_image(i, size=(56, 56)) for i in range(args.num_images)])
    path = Path(args.dataset)
    if path.is_dir() and (path / "dataset_info.json").exists():
        ds = load_from_disk(args.dataset)
    elif path.is_dir():
        ds = load_dataset("imagefolder", data_dir=args.dataset, split="train")
    else:
        ds = load_dataset(args.dataset, split="train")
    return captioning_dataset(ds)


def _quiet() -> None:
    """Little beside this example's own lines (as ``multitap-rl demo``): no deprecation chatter,
    no library loading bars, and DeepSpeed's log (its accelerator line among the first) on stderr;
    stdout stays empty."""
    import contextlib
    import importlib.util
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()  # loading bars; the training bar is _label_progress's
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    if "deepspeed" not in sys.modules and importlib.util.find_spec("deepspeed") is not None:
        # DeepSpeed's log handler writes to the sys.stdout of the moment it is imported, and it
        # logs while importing: import it now, with stdout pointing at stderr.
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401


def _label_progress(trainer, label: str) -> None:
    """TRL's progress bar labelled ``label``, with the last step's mean reward beside it; the
    per-step metric dicts the trainer would print to stdout go to this example's log (DEBUG)."""
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, ProgressCallback

    class LabelledBar(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # tqdm's own bar: transformers' (the base class's) is off after _quiet(), with the
            # library's loading bars.
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=state.max_steps, desc=label, unit="step", dynamic_ncols=True)
            self.current_step = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            logger.debug("step %d: %s", state.global_step, logs)
            if self.training_bar is not None and isinstance(logs.get("reward"), (int, float)):
                self.training_bar.set_postfix(reward=f"{logs['reward']:.3f}")

    trainer.remove_callback(PrinterCallback)  # present when the bar is disabled
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LabelledBar())


def build(args, reward_funcs=None, workdir: str | None = None):
    """(trainer, reward_funcs). ``reward_funcs`` overrides the MULTI-TAP reward (tests wrap it)."""
    from multitap_rl import ModelSpec
    from reward_fns import multitap_objective_rewards, multitap_reward
    from reward_fns.captioner import build_captioner_trainer

    workdir = Path(workdir or tempfile.mkdtemp(prefix="grpo-captioner-"))  # tests pass their own folder
    if args.tiny:
        from multitap_rl.testing import build_tiny_multitap

        base, ckpt = build_tiny_multitap(workdir / "tiny", seed=0)
        args.policy, args.checkpoint, args.base_model = str(base), str(ckpt), str(base)

    # The reward: lazily loaded once per process on this process's device (bf16 on GPU).
    if reward_funcs is None:
        if args.reward_url:  # the server holds the model, its heads and its settings
            spec = ModelSpec(checkpoint=args.reward_url)
        else:
            spec = ModelSpec(checkpoint=args.checkpoint, base_model=args.base_model, heads=args.heads,
                             offload=args.offload_reward, shard="zero3" if args.shard_reward else None)
        if args.objectives:
            reward_funcs = multitap_objective_rewards(spec)
        else:
            reward_funcs = multitap_reward(spec, weights=args.weights)
    trainer = build_captioner_trainer(
        args.policy, reward_funcs, _dataset(args), trainer=args.trainer,
        output_dir=args.output_dir or str(workdir / "out"), num_generations=args.num_generations,
        batch_size=args.batch_size, max_completion_length=args.max_completion_length, max_steps=args.max_steps,
        learning_rate=args.learning_rate,
    )
    _label_progress(trainer, f"{args.trainer.upper()} steps")
    return trainer, reward_funcs


def main(argv=None):
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    _quiet()
    if args.tiny:
        import torch

        torch.manual_seed(0)
    keep = args.output_dir is not None or not args.tiny
    with tempfile.TemporaryDirectory(prefix="grpo-captioner-") as tmp:  # --tiny: removed at the end
        workdir = args.output_dir if keep and args.output_dir else tmp
        trainer, _ = build(args, workdir=workdir)
        trainer.train()
        logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        logger.info("%d steps; mean reward per step: %s", len(logged), ", ".join(f"{r:.3f}" for r in logged))
        logger.info("outputs in %s", trainer.args.output_dir if keep else "a temporary folder (removed; pass "
                    "--output-dir to keep them)")
    return trainer


if __name__ == "__main__":
    main()
