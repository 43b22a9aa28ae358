"""multitap-rl: MULTI-TAP image-text rewards (overall + human-interpretable dimensions) for RL.

Public names (imported lazily: ``multitap-rl --help`` does not import torch):

* :class:`MultiTapModel`, :class:`ScoreOutput`, :class:`ModelSpec`, :class:`EngineConfig` -- which
  model, loaded how; load and score;
* :class:`Weights`, :class:`RewardCombiner` -- user weights, normalisation and gates;
* :class:`RidgeHeads` -- stage-2 heads; :func:`list_presets`, :func:`list_schemas` -- the weights
  presets and objective schemas that ship with the package;
* the errors of :mod:`multitap_rl.errors` (``MultiTapError`` and its subclasses).

Reward adapters for trainers live in the top-level package ``reward_fns``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EngineConfig",
    "HeadsError",
    "MultiTapError",
    "ModelSpec",
    "MultiTapModel",
    "RewardCombiner",
    "RidgeHeads",
    "SampleError",
    "ScoreOutput",
    "Weights",
    "__version__",
    "list_presets",
    "list_schemas",
]

__version__ = "0.1.0"

_LAZY = {
    "MultiTapModel": ".model",
    "ScoreOutput": ".model",
    "EngineConfig": ".scoring",
    "ModelSpec": ".spec",
    "Weights": ".combiner",
    "RewardCombiner": ".combiner",
    "RidgeHeads": ".heads",
    "list_presets": ".presets",
    "list_schemas": ".schemas",
    "CheckpointError": ".errors",
    "ConfigError": ".errors",
    "DataError": ".errors",
    "HeadsError": ".errors",
    "MultiTapError": ".errors",
    "SampleError": ".errors",
}

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use
    from .combiner import RewardCombiner, Weights
    from .errors import CheckpointError, ConfigError, DataError, HeadsError, MultiTapError, SampleError
    from .heads import RidgeHeads
    from .model import MultiTapModel, ScoreOutput
    from .presets import list_presets
    from .schemas import list_schemas
    from .scoring import EngineConfig
    from .spec import ModelSpec

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
