"""User weights over MULTI-TAP's dimensions, and how per-dimension scores become one reward.

``overall`` (the stage-1 head) is always a dimension; stage-2 heads add named ones.

* :class:`Weights` -- from a dict, a string ``"safety=2,clarity=1"``, a YAML file, or the name
  of a preset under ``recipes/weights/``.
* :class:`Gate` -- a dimension below a threshold caps the reward or subtracts a penalty.
* :class:`RewardCombiner` -- normalise each weighted dimension (none | fixed | running), take the
  weighted sum, apply gates; returns the reward together with every per-dimension value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "NORMALIZATIONS",
    "OVERALL",
    "CombinedReward",
    "Gate",
    "RewardCombiner",
    "RunningStats",
    "Weights",
    "weights_presets_dir",
]

OVERALL = "overall"
NORMALIZATIONS = ("none", "fixed", "running")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def weights_presets_dir() -> Path:
    """``recipes/weights`` of a source checkout (presets are plain YAML files)."""
    return Path(os.environ.get("MULTITAP_WEIGHTS_DIR", Path(__file__).resolve().parent.parent / "recipes" / "weights"))


@dataclass(frozen=True)
class Weights:
    """An ordered, immutable map ``dimension -> weight`` (finite floats, at least one non-zero)."""

    items_: tuple[tuple[str, float], ...]

    def __post_init__(self):
        if not self.items_:
            raise ValueError("weights are empty; give at least one dimension, e.g. 'overall=1'")
        seen = set()
        for name, w in self.items_:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"bad dimension name {name!r} in weights")
            if name in seen:
                raise ValueError(f"dimension {name!r} appears twice in weights")
            seen.add(name)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"weight for {name!r} must be a finite number, got {w!r}")
        if all(w == 0 for _, w in self.items_):
            raise ValueError("all weights are zero")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, mapping: Mapping[str, float]) -> Weights:
        return cls(tuple((str(k), _number(k, v)) for k, v in mapping.items()))

    @classmethod
    def from_string(cls, spec: str) -> Weights:
        """``"safety=2, clarity=1"`` (``,`` or ``;`` separated)."""
        pairs = []
        for part in re.split(r"[,;]", spec):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"weights {spec!r}: expected name=value, got {part!r}")
            name, value = (s.strip() for s in part.split("=", 1))
            try:
                pairs.append((name, float(value)))
            except ValueError:
                raise ValueError(f"weights {spec!r}: {value!r} is not a number (for {name!r})") from None
        return cls(tuple(pairs))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Weights:
        """A YAML file ``{weights: {dim: w, ...}}`` (or the mapping at top level)."""
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if isinstance(data, dict) and "weights" in data:
            data = data["weights"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of dimension -> weight")
        return cls.from_dict(data)

    @classmethod
    def parse(cls, spec: Weights | Mapping[str, float] | str | os.PathLike | None) -> Weights:
        """Any accepted form; ``None`` means ``overall=1``. A string is a file path if it exists,
        a preset name if ``recipes/weights/<name>.yaml`` exists, else ``name=value`` pairs."""
        if spec is None:
            return cls(((OVERALL, 1.0),))
        if isinstance(spec, Weights):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "=" not in spec):
            path = Path(spec)
            if path.is_file():
                return cls.from_yaml(path)
            preset = weights_presets_dir() / f"{spec}.yaml"
            if isinstance(spec, str) and preset.is_file():
                return cls.from_yaml(preset)
            raise ValueError(f"weights {os.fspath(spec)!r}: no such file or preset, and not 'name=value' pairs")
        if isinstance(spec, str):
            return cls.from_string(spec)
        raise TypeError(f"weights must be a dict, a string, a path or Weights, got {type(spec).__name__}")

    # -- access --------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items_)

    def items(self) -> tuple[tuple[str, float], ...]:
        return self.items_

    def as_dict(self) -> dict[str, float]:
        return dict(self.items_)

    def check(self, available: Iterable[str]) -> None:
        """Raise ``ValueError`` naming any dimension not in ``available`` and listing the valid ones."""
        available = list(available)
        unknown = [n for n in self.names if n not in available]
        if unknown:
            raise ValueError(
                f"unknown dimension(s) {unknown} in weights; valid names: {available}"
                + ("" if len(available) > 1 else " (load stage-2 heads for more dimensions)")
            )

    def __str__(self) -> str:
        return ",".join(f"{n}={w:g}" for n, w in self.items_)


def _number(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"weight for {name!r} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Gate:
    """If ``dim`` (raw value) is below ``threshold``: ``mode="cap"`` limits the reward to at most
    ``value``; ``mode="penalty"`` subtracts ``value`` from it."""

    dim: str
    threshold: float
    mode: str = "cap"
    value: float = 0.0

    def __post_init__(self):
        if self.mode not in ("cap", "penalty"):
            raise ValueError(f"gate mode must be 'cap' or 'penalty', got {self.mode!r}")
        for n in ("threshold", "value"):
            if not math.isfinite(getattr(self, n)):
                raise ValueError(f"gate {n} must be finite")

    @classmethod
    def parse(cls, spec: Gate | Mapping | str) -> Gate:
        """A Gate, a dict, or ``"safety<0.5:cap=0"`` / ``"safety<0.5:penalty=1"``."""
        if isinstance(spec, Gate):
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec)
        m = re.match(r"^\s*([A-Za-z_][\w.\-]*)\s*<\s*([-+0-9.eE]+)\s*(?::\s*(cap|penalty)\s*=\s*([-+0-9.eE]+))?\s*$",
                     spec)
        if not m:
            raise ValueError(f"gate {spec!r}: expected 'dim<threshold[:cap=v|:penalty=v]'")
        try:
            return cls(m.group(1), float(m.group(2)), m.group(3) or "cap", float(m.group(4) or 0.0))
        except ValueError:
            raise ValueError(f"gate {spec!r}: threshold and value must be numbers") from None


class RunningStats:
    """Exponential moving mean/variance per dimension (for ``normalize="running"`` in RL)."""

    def __init__(self, momentum: float = 0.99, eps: float = 1e-6):
        if not 0.0 <= momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        self.momentum, self.eps = momentum, eps
        self.mean: dict[str, float] = {}
        self.var: dict[str, float] = {}

    def update(self, name: str, values: torch.Tensor) -> None:
        values = values.double()
        m, v = float(values.mean()), float(values.var(unbiased=False)) if values.numel() > 1 else 0.0
        if name not in self.mean:
            self.mean[name], self.var[name] = m, v
            return
        a = self.momentum
        old = self.mean[name]
        self.mean[name] = a * old + (1 - a) * m
        # variance of the a : (1 - a) mixture of the old and the batch distribution about the new mean
        self.var[name] = a * self.var[name] + (1 - a) * v + a * (1 - a) * (m - old) ** 2

    def normalize(self, name: str, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean[name]) / math.sqrt(self.var[name] + self.eps)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "mean": dict(self.mean), "var": dict(self.var)}


@dataclass
class CombinedReward:
    """``reward``: (N,) float32. ``dims``: every dimension's raw (N,) values. ``normalized``: the
    weighted dimensions after normalisation. ``gated``: (N,) bool, True where a gate fired."""

    reward: torch.Tensor
    dims: dict[str, torch.Tensor]
    normalized: dict[str, torch.Tensor] = field(default_factory=dict)
    gated: torch.Tensor | None = None


class RewardCombiner:
    """Weights + normalisation + gates over named per-sample scores.

    Args:
        weights: anything :meth:`Weights.parse` accepts.
        available: the dimension names the scorer produces (``overall`` + head dimensions).
        normalize: "none" | "fixed" (z-score with ``stats[dim] = (mean, std)``, e.g. from the
            heads' training statistics) | "running" (EMA mean/variance updated on every call).
        gates: :class:`Gate` specs, applied after weighting in the order given.
    """

    def __init__(self, weights=None, available: Sequence[str] = (OVERALL,), *, normalize: str = "none",
                 stats: Mapping[str, tuple[float, float]] | None = None, gates: Sequence = (),
                 momentum: float = 0.99):
        self.weights = Weights.parse(weights)
        self.available = list(available)
        self.weights.check(self.available)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        self.gates = [Gate.parse(g) for g in gates]
        for g in self.gates:
            if g.dim not in self.available:
                raise ValueError(f"gate on unknown dimension {g.dim!r}; valid names: {self.available}")
        self.stats = dict(stats or {})
        if normalize == "fixed":
            missing = [n for n in self.weights.names if n not in self.stats]
            if missing:
                raise ValueError(f"normalize='fixed' needs (mean, std) for {missing}; the heads file stores them "
                                 "for its dimensions (use 'none' or 'running' otherwise)")
            for n in self.weights.names:  # only the weighted dimensions are divided by their std
                std = self.stats[n][1]
                if not std > 0:
                    raise ValueError(f"fixed normalisation: std of {n!r} must be > 0, got {std}")
        self.running = RunningStats(momentum) if normalize == "running" else None

    def __call__(self, dims: Mapping[str, torch.Tensor]) -> CombinedReward:
        names = list(dims)
        missing = [n for n in self.weights.names if n not in dims]
        if missing:
            raise ValueError(f"scores lack weighted dimension(s) {missing}; got {names}")
        raw = {}
        for k, v in dims.items():
            try:
                raw[k] = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v).float().cpu().reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"dimension {k!r}: expected a tensor or a sequence of numbers, got "
                                f"{type(v).__name__}") from None
        n = next(iter(raw.values())).numel() if raw else 0
        for k, v in raw.items():
            if v.numel() != n:
                raise ValueError(f"dimension {k!r} has {v.numel()} values, expected {n}")
            if not torch.isfinite(v).all():
                bad = int((~torch.isfinite(v)).nonzero()[0])
                raise ValueError(f"dimension {k!r} is not finite at sample {bad}")
        reward = torch.zeros(n, dtype=torch.float32)
        normalized = {}
        for name, w in self.weights.items():
            v = raw[name]
            if self.normalize == "fixed":
                mean, std = self.stats[name]
                v = (v - mean) / std
            elif self.normalize == "running" and n:
                self.running.update(name, v)
                v = self.running.normalize(name, v).float()
            normalized[name] = v
            reward = reward + w * v
        gated = torch.zeros(n, dtype=torch.bool)
        for g in self.gates:
            low = raw[g.dim] < g.threshold
            gated |= low
            if g.mode == "cap":
                reward = torch.where(low, torch.minimum(reward, torch.tensor(g.value)), reward)
            else:
                reward = torch.where(low, reward - g.value, reward)
        return CombinedReward(reward=reward.float(), dims=raw, normalized=normalized, gated=gated)
