"""A scorer over decoded (image, text) samples for PPO-style training loops.

TRL 1.x has no ``PPOTrainer`` (it lived in ``trl.experimental.ppo`` until TRL 0.29, where it
expected a reward *model* with a text-classification head, i.e. no images). Custom PPO / REINFORCE
loops, OpenRLHF-style remote reward functions and ``trl<0.29`` users with their own rollout code
decode their samples and call :class:`MultiTapScorer` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .core import CoreReward, RewardCore

__all__ = ["MultiTapScorer"]


class MultiTapScorer(CoreReward):
    """``scorer(images, texts, questions=None) -> Tensor (N,) float32`` weighted MULTI-TAP rewards.

    Same arguments as :func:`reward_fns.trl.multitap_reward` (weights, normalisation, gates,
    lazy once-per-process loading, offload, ``shard``). ``output_device`` places the returned tensor (e.g. the
    policy's device); default CPU. ``on_invalid``: ``"raise"`` (default) or a float given to a
    sample that cannot be scored. :meth:`score` returns the full
    :class:`~multitap_rl.combiner.CombinedReward` (reward + every dimension) of the valid samples.
    """

    def __init__(self, model_or_path, base_model=None, heads=None, weights=None, *, normalize: str = "none",
                 gates: Sequence = (), momentum: float = 0.99, device=None, dtype=None, rope=None,
                 max_batch_tokens: int = 8192, offload: bool = False, output_device=None, on_invalid="raise",
                 image_size="auto", max_length="auto", shard=None):
        core = RewardCore(model_or_path, base_model=base_model, heads=heads, weights=weights, normalize=normalize,
                          gates=gates, momentum=momentum, device=device, dtype=dtype, rope=rope,
                          max_batch_tokens=max_batch_tokens, offload=offload, image_size=image_size,
                          max_length=max_length, on_invalid=on_invalid, invalid_options=("raise",), shard=shard)
        super().__init__(core, "multitap_scorer")
        self.output_device = None if output_device is None else torch.device(output_device)

    def _combined(self, images, texts, questions):
        out = self.core.score(images, texts, questions)
        self.core.note_invalid(out.errors)
        combined, idx = self.core.combine({"overall": out.overall, **out.dims}, out.valid)
        return combined, idx, len(out)

    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None):
        """The :class:`~multitap_rl.combiner.CombinedReward` of the samples that could be scored."""
        return self._combined(images, texts, questions)[0]

    def __call__(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None) -> torch.Tensor:
        combined, idx, n = self._combined(images, texts, questions)
        fill = self.core.on_invalid if isinstance(self.core.on_invalid, float) else 0.0  # "raise": none invalid
        reward = torch.full((n,), fill, dtype=torch.float32)
        reward[idx] = combined.reward.detach().float().cpu()
        return reward if self.output_device is None else reward.to(self.output_device)
