"""MULTI-TAP as a text-to-image reward for DDPO-style trainers.

The contract of TRL's ``DDPOTrainer`` (trl<=0.22.2), ddpo-pytorch and flow_grpo::

    reward_fn(images, prompts, metadata) -> (rewards, info)

* ``images``: a batch of generated images -- a (B, 3, H, W) float tensor in [0, 1] (float32,
  float16 or bfloat16, any device; what ``DDPOTrainer`` passes), a (B, H, W, 3) uint8 numpy
  array or tensor (what ddpo-pytorch and flow_grpo pass to their own scorers), or a list of
  per-image objects (PIL images, arrays, paths).
* ``prompts``: one string per image (a tuple from the trainer); ``metadata``: one dict per image
  (unused; its length is checked when given).
* ``rewards``: (B,) float32 CPU tensor, detached -- the user-weighted combination of ``overall``
  and the stage-2 dimensions (normalisation and gates of :class:`RewardCombiner`).
* ``info``: every dimension's raw (B,) float32 CPU values by name (``"overall"``, head
  dimensions), plus ``"gated"`` ((B,) bool) when gates are set.

The prompt is scored as the caption, in MULTI-TAP's text-to-image layout: user "Describe this
image.", assistant [image, prompt]. Float images are rounded to uint8 and resized with PIL as the
reference does. For reward backpropagation (AlignProp, DRaFT) use
:func:`reward_fns.differentiable.differentiable_reward`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from multitap_rl.errors import DataError

from .core import CoreReward, RewardCore

__all__ = ["DDPOReward", "check_prompts", "ddpo_reward", "images_to_pil", "split_images"]

logger = logging.getLogger(__name__)

_SHAPES = "a (B, 3, H, W) float tensor in [0, 1], a (B, H, W, 3) uint8 array, or a list of images"


def split_images(images, n: int | None = None) -> list:
    """A batch of generated images as one object per sample (not decoded yet): the batch's shape and
    dtype are checked here; each sample is checked when it is loaded (errors name it)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim != 4:
            raise DataError(f"images must be {_SHAPES}; got an array of shape {tuple(images.shape)}"
                            + (" (add the batch dimension)" if images.ndim == 3 else ""))
        if isinstance(images, torch.Tensor):
            images = images.detach()
            if images.device.type != "cpu":
                images = images.cpu()
            if images.dtype == torch.uint8:  # the image loader reads torch tensors as floats
                images = images.numpy()
        dtype = images.dtype
        if not (dtype == torch.uint8 or dtype == np.uint8 or _is_float(dtype)):
            raise TypeError(f"images must be float in [0, 1] or uint8, got dtype {dtype}")
        shape = tuple(images.shape[1:])
        if not ((shape[0] == 3 and shape[-1] != 3) or shape[-1] == 3):
            raise DataError(f"images must have 3 channels, (B, 3, H, W) or (B, H, W, 3); got shape "
                            f"{tuple(images.shape)}")
        batch = [images[i] for i in range(images.shape[0])]
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        batch = list(images)
    else:
        raise TypeError(f"images must be {_SHAPES}; got {type(images).__name__}")
    if n is not None and len(batch) != n:
        raise DataError(f"got {len(batch)} images but {n} prompts; pass one prompt per image")
    return batch


def images_to_pil(images, n: int | None = None) -> list:
    """A batch of generated images as a list of RGB PIL images (one per sample).

    Float pixels are checked (finite, in [0, 1]) and rounded to uint8 exactly as
    :func:`multitap_rl.images.load_image` does; errors name the sample.
    """
    from multitap_rl.images import load_image

    return [load_image(img, i) for i, img in enumerate(split_images(images, n))]


def _is_float(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return np.issubdtype(dtype, np.floating)


def check_prompts(prompts) -> list[str]:
    """One non-empty string per image; a single string is refused (it would be read per character)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a tuple or list of strings (one per image), got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i}: expected str, got {type(p).__name__}")
        if not p.strip():
            raise DataError(f"prompt {i}: empty prompt (MULTI-TAP scores the image against its prompt)")
        out.append(p)
    return out


def _check_metadata(metadata, n: int) -> None:
    if metadata is None or isinstance(metadata, dict):
        return
    if isinstance(metadata, Sequence) and not isinstance(metadata, str) and len(metadata) not in (0, n):
        raise DataError(f"got {len(metadata)} metadata entries for {n} images")


class DDPOReward(CoreReward):
    """The weighted MULTI-TAP reward for DDPO-style trainers (see :func:`ddpo_reward`).

    ``__call__(images, prompts, metadata=None) -> (rewards (B,) float32 CPU, info dict)``.
    Picklable: it holds a small spec; the model loads once per process on first use.
    """

    def __init__(self, core: RewardCore, *, name: str = "multitap"):
        super().__init__(core, name)

    def __call__(self, images, prompts, metadata=None) -> tuple[torch.Tensor, dict]:
        # 1. Validate and convert (cheap, before the model loads).
        prompts = check_prompts(prompts)
        batch = split_images(images, n=len(prompts))
        _check_metadata(metadata, len(prompts))
        # 2. One core call (caption layout: the prompt is the caption).
        out = self.core.evaluate(batch, prompts)
        info: dict = dict(out.scores)
        if out.gated is not None:
            info["gated"] = out.gated
        if out.errors:
            info["valid"] = out.valid
        rewards = out.tensor()
        logger.debug("%s: mean reward %.4f over %d images", self.__name__, float(rewards.mean()) if len(out) else 0.0,
                     len(out))
        return rewards, info


def ddpo_reward(model_or_spec, weights=None, *, base_model=None, heads=None, normalize: str = "none",
                gates: Sequence = (), momentum: float = 0.99, on_invalid="raise", name: str = "multitap") -> DDPOReward:
    """A DDPO reward function: ``(images, prompts, metadata) -> (rewards, info)``.

    Args:
        model_or_spec: a loaded ``MultiTapModel``, a :class:`~multitap_rl.ModelSpec`, or a MULTI-TAP
            checkpoint (directory or hub id) loaded lazily, once per process, on that process's
            device (bf16 on GPU).
        weights: over ``overall`` and the heads' dimensions (dict, ``"overall=1,clarity=0.5"``, YAML
            path or preset name); default ``overall=1``. Unknown names raise ``ConfigError`` here.
        base_model, heads: beside a checkpoint path.
        normalize: "none" | "fixed" (z-score with the heads' stored statistics) | "running" (EMA
            with ``momentum``, shared across ranks).
        gates: e.g. ``["safety<0.5:cap=0"]``.
        on_invalid: ``"raise"`` (default: an image that cannot be scored fails the call, naming it)
            or a float given to such images (their ``info`` values are NaN and ``info["valid"]``
            marks them). A DDPO reward is a tensor, so ``"skip"`` is not offered.
        name: the callable's ``__name__``.

    Example (TRL 0.22.2)::

        trainer = DDPOTrainer(DDPOConfig(...), ddpo_reward(ckpt, weights="overall=1"), prompt_fn, sd_pipeline)
    """
    core = RewardCore(model_or_spec, base_model=base_model, heads=heads, weights=weights, normalize=normalize,
                      gates=gates, momentum=momentum, on_invalid=on_invalid, invalid_options=("raise",))
    return DDPOReward(core, name=name)
