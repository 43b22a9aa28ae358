"""A scorer over decoded (image, text) samples for PPO-style training loops.

TRL 1.x has no ``PPOTrainer`` (it lived in ``trl.experimental.ppo`` until TRL 0.29, where it
expected a reward *model* with a text-classification head, i.e. no images). Custom PPO / REINFORCE
loops, OpenRLHF-style remote reward functions and ``trl<0.29`` users with their own rollout code
decode their samples and call :class:`MultiTapScorer` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .core import CoreReward, RewardBatch, RewardCore

__all__ = ["MultiTapScorer"]


class MultiTapScorer(CoreReward):
    """``scorer(images, texts, questions=None) -> Tensor (N,) float32`` weighted MULTI-TAP rewards.

    ``model_or_spec``, ``weights``, normalisation, gates and ``on_invalid`` as for
    :func:`reward_fns.trl.multitap_reward` (``on_invalid``: ``"raise"``, the default, or a float
    given to a sample that cannot be scored). ``output_device`` places the returned tensor (e.g.
    the policy's device); default CPU. :meth:`score` returns the full
    :class:`~reward_fns.core.RewardBatch` (reward + every dimension + errors).
    """

    def __init__(self, model_or_spec, weights=None, *, base_model=None, heads=None, normalize: str = "none",
                 gates: Sequence = (), momentum: float = 0.99, on_invalid="raise", output_device=None):
        core = RewardCore(model_or_spec, base_model=base_model, heads=heads, weights=weights, normalize=normalize,
                          gates=gates, momentum=momentum, on_invalid=on_invalid, invalid_options=("raise",))
        super().__init__(core, "multitap_scorer")
        self.output_device = None if output_device is None else torch.device(output_device)

    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None) -> RewardBatch:
        """The :class:`~reward_fns.core.RewardBatch` of the N samples (one core call)."""
        return self.core.evaluate(images, texts, questions)

    def __call__(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None) -> torch.Tensor:
        reward = self.score(images, texts, questions).tensor()
        return reward if self.output_device is None else reward.to(self.output_device)
