"""Build a TRL GRPO/RLOO trainer that fine-tunes a Qwen2-VL captioner against a MULTI-TAP reward.

Shared by ``examples/grpo_captioner.py`` and ``multitap-rl demo``. Settings that matter on CPU are
handled here: ``bf16`` only on GPU, an image-only processor (no torchvision), a plain callable
reward (an ``nn.Module`` reward would be treated as a text classifier by TRL).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from multitap_rl.errors import ConfigError, DataError, require

__all__ = ["CAPTION_PROMPT", "build_captioner_trainer", "captioning_dataset"]

logger = logging.getLogger(__name__)

CAPTION_PROMPT = "Describe this image."


def captioning_dataset(images, prompt: str = CAPTION_PROMPT):
    """A ``datasets.Dataset`` with ``prompt`` (conversational, one image placeholder) and ``image``.

    ``images``: a list of images (PIL or paths) or a ``datasets.Dataset`` with an ``image`` column.
    """
    from datasets import Dataset

    if isinstance(images, Dataset):
        ds = images
        if "image" not in ds.column_names:
            raise DataError(f"dataset has no 'image' column (columns: {ds.column_names})")
    else:
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or not images:
            raise DataError("images must be a non-empty list or a datasets.Dataset with an 'image' column")
        from multitap_rl.images import load_image

        ds = Dataset.from_list([{"image": load_image(im, i)} for i, im in enumerate(images)])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return ds.map(lambda _: {"prompt": messages})


def build_captioner_trainer(policy, reward_funcs, dataset, *, trainer: str = "grpo", output_dir: str,
                            num_generations: int = 4, batch_size: int = 4, max_completion_length: int = 32,
                            max_steps: int = 100, learning_rate: float = 1e-5, seed: int = 0, **config):
    """A ready ``GRPOTrainer``/``RLOOTrainer``.

    Args:
        policy: a Qwen2-VL model id/directory (loaded here) or a loaded ``Qwen2VLForConditionalGeneration``.
        reward_funcs: a reward callable or a list of them (e.g. ``multitap_objective_rewards``).
        dataset: from :func:`captioning_dataset`.
        **config: further ``GRPOConfig``/``RLOOConfig`` fields (e.g. ``reward_weights``).
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from multitap_rl.backbones.qwen2_vl import image_only_processor

    if trainer not in ("grpo", "rloo"):
        raise ConfigError(f"trainer must be 'grpo' or 'rloo', got {trainer!r}")
    trl = require("trl", "trl", "RL training")
    on_gpu = torch.cuda.is_available()
    # DeepSpeed launched without GPUs (CPU processes): accelerate must not be told "cpu" (it would
    # fall back to plain DDP) and needs the gloo backend named, or it counts one process only.
    deepspeed_on_cpu = not on_gpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    if isinstance(policy, str):
        name = policy
        policy = Qwen2VLForConditionalGeneration.from_pretrained(
            name, dtype=torch.bfloat16 if on_gpu else torch.float32)
    else:
        name = policy.name_or_path
    processor = image_only_processor(name)
    cfg = dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size, num_generations=num_generations,
        max_completion_length=max_completion_length, max_steps=max_steps, learning_rate=learning_rate,
        logging_steps=1, report_to=[], save_strategy="no", bf16=on_gpu, use_cpu=not on_gpu and not deepspeed_on_cpu,
        seed=seed,
    )
    if deepspeed_on_cpu:
        cfg["ddp_backend"] = "gloo"
    cfg.update(config)
    if trainer == "grpo":
        args, cls = trl.GRPOConfig(**cfg), trl.GRPOTrainer
    else:
        args, cls = trl.RLOOConfig(**cfg), trl.RLOOTrainer
    return cls(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
               processing_class=processor)
