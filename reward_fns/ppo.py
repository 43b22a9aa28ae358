"""A scorer over decoded (image, text) samples for PPO-style training loops.

TRL 1.x has no ``PPOTrainer`` (it lived in ``trl.experimental.ppo`` until TRL 0.29, where it
expected a reward *model* with a text-classification head, i.e. no images). Custom PPO / REINFORCE
loops, OpenRLHF-style remote reward functions and ``trl<0.29`` users with their own rollout code
decode their samples and call :class:`MultiTapScorer` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._shared import get_scorer, spec_for
from .trl import _dimension_names

__all__ = ["MultiTapScorer"]


class MultiTapScorer:
    """``scorer(images, texts, questions=None) -> Tensor (N,) float32`` weighted MULTI-TAP rewards.

    Same arguments as :func:`reward_fns.trl.multitap_reward` (weights, normalisation, gates,
    lazy once-per-process loading, offload). ``output_device`` places the returned tensor (e.g. the
    policy's device); default CPU. :meth:`score` returns the full
    :class:`~multitap_rl.objectives.CombinedReward` (reward + every dimension).
    """

    def __init__(self, model_or_path, base_model=None, heads=None, weights=None, *, normalize: str = "none",
                 gates: Sequence = (), device=None, dtype=None, rope=None, max_batch_tokens: int = 8192,
                 offload: bool = False, output_device=None, momentum: float = 0.99):
        from multitap_rl.objectives import RewardCombiner

        self.spec, model = spec_for(model_or_path, base_model=base_model, heads=heads, device=device,
                                    dtype=dtype, rope=rope, max_batch_tokens=max_batch_tokens, offload=offload)
        if model is not None:
            get_scorer(self.spec, model)
        names, stats = _dimension_names(self.spec, model)
        self.combiner = RewardCombiner(weights, names, normalize=normalize, stats=stats, gates=gates,
                                       momentum=momentum)
        self.output_device = None if output_device is None else torch.device(output_device)
        self.__name__ = "multitap_scorer"

    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None):
        return self.combiner(get_scorer(self.spec).score(images, texts, questions))

    def __call__(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None) -> torch.Tensor:
        reward = self.score(images, texts, questions).reward
        return reward if self.output_device is None else reward.to(self.output_device)
