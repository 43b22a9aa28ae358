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

from ._shared import ScorerSpec, get_scorer, spec_for

__all__ = ["DDPOReward", "check_prompts", "ddpo_reward", "images_to_pil"]

logger = logging.getLogger(__name__)

_SHAPES = "a (B, 3, H, W) float tensor in [0, 1], a (B, H, W, 3) uint8 array, or a list of images"


def images_to_pil(images, n: int | None = None) -> list:
    """A batch of generated images as a list of RGB PIL images (one per sample).

    Float pixels are checked (finite, in [0, 1]) and rounded to uint8 exactly as
    :func:`multitap_rl.images.load_image` does; errors name the sample.
    """
    from multitap_rl.images import load_image

    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim != 4:
            raise ValueError(f"images must be {_SHAPES}; got an array of shape {tuple(images.shape)}"
                             + (" (add the batch dimension)" if images.ndim == 3 else ""))
        if isinstance(images, torch.Tensor):
            images = images.detach()
            if images.device.type != "cpu":
                images = images.cpu()
            if images.dtype == torch.uint8:  # the image loader reads torch tensors as floats
                images = images.numpy()
        batch = [images[i] for i in range(images.shape[0])]
        dtype = images.dtype
        if not (dtype == torch.uint8 or dtype == np.uint8 or _is_float(dtype)):
            raise TypeError(f"images must be float in [0, 1] or uint8, got dtype {dtype}")
        for i, img in enumerate(batch):
            shape = tuple(img.shape)
            channels_first = shape[0] == 3 and shape[-1] != 3
            if not (channels_first or shape[-1] == 3):
                raise ValueError(f"image {i}: expected 3 channels, (3, H, W) or (H, W, 3); got shape {shape}")
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        batch = list(images)
    else:
        raise TypeError(f"images must be {_SHAPES}; got {type(images).__name__}")
    if n is not None and len(batch) != n:
        raise ValueError(f"got {len(batch)} images but {n} prompts; pass one prompt per image")
    return [load_image(img, i) for i, img in enumerate(batch)]


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
            raise ValueError(f"prompt {i}: empty prompt (MULTI-TAP scores the image against its prompt)")
        out.append(p)
    return out


def _check_metadata(metadata, n: int) -> None:
    if metadata is None or isinstance(metadata, dict):
        return
    if isinstance(metadata, Sequence) and not isinstance(metadata, str) and len(metadata) not in (0, n):
        raise ValueError(f"got {len(metadata)} metadata entries for {n} images")


class DDPOReward:
    """The weighted MULTI-TAP reward for DDPO-style trainers (see :func:`ddpo_reward`).

    ``__call__(images, prompts, metadata=None) -> (rewards (B,) float32 CPU, info dict)``.
    Picklable: it holds a small spec; the model loads once per process on first use.
    """

    def __init__(self, spec: ScorerSpec, model=None, *, weights=None, normalize: str = "none", gates=(),
                 name: str = "multitap", momentum: float = 0.99):
        from multitap_rl.objectives import RewardCombiner

        from .trl import _dimension_names

        self.spec = spec
        if model is not None:
            get_scorer(spec, model)
        names, stats = _dimension_names(spec, model)
        self.combiner = RewardCombiner(weights, names, normalize=normalize, stats=stats, gates=gates,
                                       momentum=momentum)
        self.__name__ = name

    @property
    def weights(self):
        return self.combiner.weights

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return tuple(self.combiner.available)

    def __call__(self, images, prompts, metadata=None) -> tuple[torch.Tensor, dict]:
        # 1. Validate and convert (cheap, before the model loads).
        prompts = check_prompts(prompts)
        pils = images_to_pil(images, n=len(prompts))
        _check_metadata(metadata, len(prompts))
        if not prompts:
            return torch.zeros(0, dtype=torch.float32), {k: torch.zeros(0) for k in self.dimension_names}
        # 2. One batched forward (caption layout: the prompt is the caption), then the weighting.
        dims = get_scorer(self.spec).score(pils, prompts)
        combined = self.combiner(dims)
        info: dict = {name: values.detach().float().cpu() for name, values in combined.dims.items()}
        if self.combiner.gates:
            info["gated"] = combined.gated
        logger.debug("%s: mean reward %.4f over %d images", self.__name__, float(combined.reward.mean()), len(prompts))
        return combined.reward.detach().float().cpu(), info

    def __getstate__(self):
        return dict(self.__dict__)  # only the spec and the combiner: the model stays per process


def ddpo_reward(model_or_path, base_model=None, heads=None, weights=None, *, normalize: str = "none",
                gates: Sequence = (), device=None, dtype=None, rope=None, max_batch_tokens: int = 8192,
                offload: bool = False, name: str = "multitap") -> DDPOReward:
    """A DDPO reward function: ``(images, prompts, metadata) -> (rewards, info)``.

    Args:
        model_or_path: a loaded ``MultiTapModel``, or a MULTI-TAP checkpoint (directory or hub id)
            loaded lazily, once per process, on that process's device (bf16 on GPU).
        base_model, heads: as for ``MultiTapModel.from_pretrained``.
        weights: over ``overall`` and the heads' dimensions (dict, ``"overall=1,clarity=0.5"``, YAML
            path or preset name); default ``overall=1``. Unknown names raise ``ValueError`` here.
        normalize: "none" | "fixed" (z-score with the heads' stored statistics) | "running" (EMA).
        gates: e.g. ``["safety<0.5:cap=0"]``.
        offload: keep the reward model on CPU between calls (frees accelerator memory).
        name: the callable's ``__name__``.

    Example (TRL 0.22.2)::

        trainer = DDPOTrainer(DDPOConfig(...), ddpo_reward(ckpt, weights="overall=1"), prompt_fn, sd_pipeline)
    """
    spec, model = spec_for(model_or_path, base_model=base_model, heads=heads, device=device, dtype=dtype,
                           rope=rope, max_batch_tokens=max_batch_tokens, offload=offload)
    return DDPOReward(spec, model, weights=weights, normalize=normalize, gates=gates, name=name)
