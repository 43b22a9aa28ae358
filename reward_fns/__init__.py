"""Ready-made reward adapters over ``multitap_rl``.

* :func:`multitap_reward`, :func:`multitap_objective_rewards` -- TRL ``GRPOTrainer``/``RLOOTrainer``
* :func:`rerank` -- best-of-N reranking
* :class:`MultiTapScorer` -- PPO-style loops over decoded samples
* :func:`ddpo_reward` -- text-to-image RL with the DDPO contract ``(images, prompts, metadata) -> (rewards, info)``
* :func:`differentiable_reward` -- rewards that backpropagate to the pixels (AlignProp / DRaFT)
* :func:`build_captioner_trainer`, :func:`captioning_dataset` -- a GRPO/RLOO captioner trainer
"""

from __future__ import annotations

import importlib

__all__ = [
    "DDPOReward",
    "DifferentiableReward",
    "MultiTapScorer",
    "RankedCandidate",
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
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
