"""A differentiable MULTI-TAP reward for AlignProp/DRaFT-style trainers.

Same contract as :mod:`reward_fns.ddpo` -- ``reward_fn(images, prompts, metadata) -> (rewards,
info)`` -- but ``images`` is a (B, 3, H, W) float tensor in [0, 1] that carries gradients (TRL's
``AlignPropTrainer`` decodes it with ``torch.enable_grad()``), and ``rewards`` is a (B,) float32
tensor on the images' device whose gradient flows back to the pixels (and so into the UNet or its
LoRA). The preprocessing is the one of :mod:`multitap_rl.differentiable`: forward values equal
the ordinary (non-differentiable) path, so the numbers match :func:`reward_fns.ddpo_reward`.

``info`` holds every dimension's (B,) float32 CPU values (detached), as for DDPO.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from multitap_rl.errors import ConfigError

from .core import CoreReward, RewardCore
from .ddpo import _check_metadata, check_prompts

__all__ = ["DifferentiableReward", "differentiable_reward"]

logger = logging.getLogger(__name__)


class DifferentiableReward(CoreReward):
    """``__call__(images, prompts, metadata=None) -> (rewards (B,) with grad, info)``; see
    :func:`differentiable_reward`. Picklable (holds a spec; the model loads once per process)."""

    def __init__(self, core: RewardCore, *, name: str = "multitap"):
        super().__init__(core, name)

    def __call__(self, images: torch.Tensor, prompts, metadata=None) -> tuple[torch.Tensor, dict]:
        from multitap_rl.differentiable import check_pixels, score_pixels

        # 1. Validate before any model work.
        prompts = check_prompts(prompts)
        check_pixels(images, n=len(prompts))
        _check_metadata(metadata, len(prompts))
        # 2. Differentiable scores (model device) -> weighted reward, graph kept (the one combiner).
        dims = score_pixels(self.model, images, prompts)
        if images.requires_grad:
            for name, w in self.core.combiner.weights.items():
                if w != 0 and dims[name].grad_fn is None:
                    raise ConfigError(f"dimension {name!r} is not differentiable: its heads' predict() ran outside "
                                      "autograd; drop it from the weights or use the DDPO (non-differentiable) "
                                      "reward")
        combined, _ = self.core.combine(dims)
        info: dict = {k: v.detach().float().cpu() for k, v in dims.items()}
        if self.core.combiner.gates:
            info["gated"] = combined.gated.cpu()
        return combined.reward.to(images.device), info


def differentiable_reward(model_or_spec, weights=None, *, base_model=None, heads=None, normalize: str = "none",
                          gates: Sequence = (), momentum: float = 0.99,
                          name: str = "multitap") -> DifferentiableReward:
    """A differentiable reward function: ``(images, prompts, metadata) -> (rewards, info)``.

    Arguments as for :func:`reward_fns.ddpo_reward` (no ``on_invalid``: a batch of pixels is
    checked whole, and a bad one raises naming the image; a spec's ``offload`` is refused: the
    backward pass needs the model where the graph was built). ``images`` must be a (B, 3, H, W)
    float tensor in [0, 1]; the returned ``rewards`` (B,) float32 live on its device and carry
    gradients to it.

    Example (TRL 0.22.2)::

        trainer = AlignPropTrainer(AlignPropConfig(...), differentiable_reward(ckpt), prompt_fn, sd_pipeline)
    """
    core = RewardCore(model_or_spec, base_model=base_model, heads=heads, weights=weights, normalize=normalize,
                      gates=gates, momentum=momentum, on_invalid="raise", invalid_options=("raise",))
    if core.spec.is_remote:
        raise ConfigError("a differentiable reward needs the model here (gradients flow to the pixels); a served "
                          "reward returns numbers only: use ddpo_reward with the URL")
    if core.spec.offload or core.spec.shard is not None:
        raise ConfigError("a differentiable reward keeps its model in place for the backward pass: use a spec without "
                          "offload and shard")
    return DifferentiableReward(core, name=name)
