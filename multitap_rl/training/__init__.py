"""Training: stage 1 (backbone + reward head, MSE or Bradley-Terry; full, LoRA or head only) and
stage 2 (features to a resumable store, ridge heads with leave-one-out alpha, evaluation).

Modules: :mod:`.config` (stage-1 recipe dataclasses), :mod:`.stage1` (the run), :mod:`.examples`
(stage-1 example sets), :mod:`.lora`, :mod:`.recipe` (YAML <-> dataclasses), :mod:`.features`
(the feature store), :mod:`.ridge` (fitting heads), :mod:`.stage2` (heads on a store, evaluation).

Names are imported lazily (``torch``, ``accelerate`` and ``peft`` load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

__all__ = [
    "FeatureSet",
    "Stage1Config",
    "Stage1Result",
    "Stage1Trainer",
    "evaluate_heads",
    "extract_features",
    "fit_heads",
    "fit_ridge_heads",
    "load_features",
    "load_recipe",
    "load_stage1_config",
    "merge_lora_state_dict",
    "train_stage1",
]

_LAZY = {
    "FeatureSet": ".features",
    "extract_features": ".features",
    "load_features": ".features",
    "Stage1Config": ".config",
    "load_stage1_config": ".config",
    "Stage1Result": ".stage1",
    "Stage1Trainer": ".stage1",
    "train_stage1": ".stage1",
    "evaluate_heads": ".stage2",
    "fit_heads": ".stage2",
    "fit_ridge_heads": ".ridge",
    "load_recipe": ".recipe",
    "merge_lora_state_dict": ".lora",
}

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use
    from .config import Stage1Config, load_stage1_config
    from .features import FeatureSet, extract_features, load_features
    from .lora import merge_lora_state_dict
    from .recipe import load_recipe
    from .ridge import fit_ridge_heads
    from .stage1 import Stage1Result, Stage1Trainer, train_stage1
    from .stage2 import evaluate_heads, fit_heads

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
