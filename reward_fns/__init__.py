"""Ready-made reward adapters over ``multitap_rl``.

* :func:`multitap_reward`, :func:`multitap_objective_rewards` -- TRL ``GRPOTrainer``/``RLOOTrainer``
* :func:`rerank` -- best-of-N reranking
* :class:`MultiTapScorer` -- PPO-style loops over decoded samples
* :func:`build_captioner_trainer`, :func:`captioning_dataset` -- a GRPO/RLOO captioner trainer
"""

from __future__ import annotations

import importlib

__all__ = [
    "MultiTapScorer",
    "RankedCandidate",
    "build_captioner_trainer",
    "captioning_dataset",
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
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
