"""multitap-rl: MULTI-TAP image-text rewards (overall + human-interpretable dimensions) for RL."""

from __future__ import annotations

import importlib

__all__ = ["EngineConfig", "MultiTapModel", "ScoreOutput", "__version__"]

__version__ = "0.1.0"

_LAZY = {"MultiTapModel": ".model", "ScoreOutput": ".model", "EngineConfig": ".scoring"}


def __getattr__(name: str):  # lazy: `multitap-rl --help` should not import torch
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
