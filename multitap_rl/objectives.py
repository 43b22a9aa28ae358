"""Deprecated name of :mod:`multitap_rl.combiner` (weights, gates and the reward combiner).

Import from ``multitap_rl.combiner`` (or ``from multitap_rl import Weights, RewardCombiner``)."""

from __future__ import annotations

import warnings

from .combiner import NORMALIZATIONS, OVERALL, CombinedReward, Gate, RewardCombiner, RunningStats, Weights

__all__ = ["NORMALIZATIONS", "OVERALL", "CombinedReward", "Gate", "RewardCombiner", "RunningStats", "Weights"]

warnings.warn("multitap_rl.objectives is renamed multitap_rl.combiner", DeprecationWarning, stacklevel=2)
