"""MULTI-TAP scorers with flow_grpo's contract (text-to-image GRPO; the contract of
``flow_grpo/rewards.py`` in yifan123/flow_grpo as of 2025, not on the package index).

flow_grpo builds each scorer as ``factory(device) -> fn(images, prompts, metadata) -> (scores, meta)``
and calls it from a thread pool; ``images`` are a float (N, 3, H, W) tensor in [0, 1] (or a
(N, H, W, 3) uint8 array), ``prompts`` one string per image. Its ``multi_score(device,
score_dict)`` returns ``fn(images, prompts, metadata, ref_images=None, only_strict=True) ->
(dict, meta)`` with one array per scorer and the weighted ``"avg"``.

* :func:`multitap_score` -- the weighted MULTI-TAP reward as one flow_grpo scorer: ``scores`` a
  (N,) float32 numpy array, ``meta`` every dimension's (N,) values.
* :func:`multitap_multi_score` -- the ``multi_score`` form: one (N,) array per dimension
  (``overall`` and each head) plus ``"avg"``, the user-weighted reward (normalisation and gates
  as everywhere; not a plain average). Drop-in where flow_grpo calls ``multi_score``.

Both take the flat keywords of :data:`reward_fns.core.REWARD_KWARGS` (``model_or_path``,
``weights``, ``heads``, ``on_invalid``, ...); ``device`` is flow_grpo's own argument. The model
loads once per process. The prompt is scored as the caption (the text-to-image layout), as
:func:`reward_fns.ddpo_reward` does -- the same numbers.
"""

from __future__ import annotations

import numpy as np

from .core import core_from_kwargs
from .ddpo import DDPOReward

__all__ = ["multitap_multi_score", "multitap_score"]


def _reward(device, reward_kwargs: dict) -> DDPOReward:
    if "device" in reward_kwargs:
        raise TypeError("pass the device as flow_grpo does, as the factory's first argument")
    core = core_from_kwargs(invalid_options=("raise",), device=None if device is None else str(device),
                            **reward_kwargs)
    return DDPOReward(core, name="multitap")


def multitap_score(device=None, **reward_kwargs):
    """A flow_grpo scorer: ``fn(images, prompts, metadata) -> (scores (N,) float32, meta)``."""
    reward = _reward(device, reward_kwargs)

    def _fn(images, prompts, metadata=None):
        rewards, info = reward(images, tuple(prompts), metadata)
        return rewards.numpy(), {k: v.numpy() for k, v in info.items()}

    _fn.__name__ = "multitap"
    return _fn


def multitap_multi_score(device=None, **reward_kwargs):
    """flow_grpo's ``multi_score`` form: ``fn(images, prompts, metadata, ref_images=None,
    only_strict=True) -> ({<dim>: (N,), ..., "avg": (N,)}, {})``."""
    reward = _reward(device, reward_kwargs)

    def _fn(images, prompts, metadata=None, ref_images=None, only_strict=True):
        rewards, info = reward(images, tuple(prompts), metadata)
        details = {name: np.asarray(info[name].numpy(), dtype=np.float32) for name in reward.dimension_names}
        details["avg"] = rewards.numpy()
        return details, {}

    _fn.__name__ = "multitap_multi"
    return _fn
