"""Training: stage 1 (backbone + reward head, MSE or Bradley-Terry; full, LoRA or head only).

Names are imported lazily (``torch``, ``accelerate`` and ``peft`` load on first use).
"""

from __future__ import annotations

import importlib

__all__ = [
    "Stage1Config",
    "Stage1Result",
    "load_recipe",
    "load_stage1_config",
    "merge_lora_state_dict",
    "train_stage1",
]

_LAZY = {
    "Stage1Config": ".stage1",
    "Stage1Result": ".stage1",
    "load_stage1_config": ".stage1",
    "train_stage1": ".stage1",
    "load_recipe": ".recipe",
    "merge_lora_state_dict": ".lora",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
