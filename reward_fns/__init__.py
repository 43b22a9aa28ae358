"""Ready-made reward adapters over ``multitap_rl``.

* :func:`multitap_reward`, :func:`multitap_objective_rewards` -- TRL ``GRPOTrainer``/``RLOOTrainer``
* :func:`rerank` -- best-of-N reranking
* :class:`MultiTapScorer` -- PPO-style loops over decoded samples
* :func:`ddpo_reward` -- text-to-image RL with the DDPO contract ``(images, prompts, metadata) -> (rewards, info)``
* :func:`differentiable_reward` -- rewards that backpropagate to the pixels (AlignProp / DRaFT)
* :func:`build_captioner_trainer`, :func:`captioning_dataset` -- a GRPO/RLOO captioner trainer
* :mod:`reward_fns.verl` -- verl's reward manager and custom reward functions (and verl-omni's);
  :mod:`reward_fns.flow_grpo` -- flow_grpo's scorer factories; :mod:`reward_fns.remote` -- a
  served reward (``multitap-rl serve``) behind the same core: a URL goes where a checkpoint goes

All of them wrap one :class:`~reward_fns.core.RewardCore` (model spec + scorer + combiner; one
core call, ``evaluate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multitap_rl._lazy import lazy_exports

__all__ = [
    "DDPOReward",
    "DifferentiableReward",
    "MultiTapScorer",
    "RankedCandidate",
    "RewardCore",
    "build_captioner_trainer",
    "captioning_dataset",
    "ddpo_reward",
    "differentiable_reward",
    "multitap_objective_rewards",
    "multitap_reward",
    "rerank",
]

_LAZY = {
    "multitap_reward": ".trl",
    "multitap_objective_rewards": ".trl",
    "rerank": ".best_of_n",
    "RankedCandidate": ".best_of_n",
    "MultiTapScorer": ".ppo",
    "build_captioner_trainer": ".captioner",
    "captioning_dataset": ".captioner",
    "ddpo_reward": ".ddpo",
    "DDPOReward": ".ddpo",
    "differentiable_reward": ".differentiable",
    "DifferentiableReward": ".differentiable",
    "RewardCore": ".core",
}

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use
    from .best_of_n import RankedCandidate, rerank
    from .captioner import build_captioner_trainer, captioning_dataset
    from .core import RewardCore
    from .ddpo import DDPOReward, ddpo_reward
    from .differentiable import DifferentiableReward, differentiable_reward
    from .ppo import MultiTapScorer
    from .trl import multitap_objective_rewards, multitap_reward

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
