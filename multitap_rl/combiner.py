"""User weights over MULTI-TAP's dimensions, and how per-dimension scores become one reward.

``overall`` (the stage-1 head) is always a dimension; stage-2 heads add named ones.

* :class:`Weights` -- from a dict, a string ``"safety=2,clarity=1"``, a YAML file, or the name
  of a preset (:func:`multitap_rl.presets.list_presets`).
* :class:`Gate` -- a dimension below a threshold caps the reward or subtracts a penalty.
* :class:`RunningStats` -- exponential moving mean/variance per dimension; when
  ``torch.distributed`` is initialised every update is computed from the moments of the whole
  global batch (gathered from all ranks), so every rank normalises with the same statistics.
* :class:`RewardCombiner` -- normalise each weighted dimension (none | fixed | running), take the
  weighted sum, apply gates; returns the reward (on the scores' device, keeping their autograd
  graph, so the differentiable reward uses it too) together with every per-dimension value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dimensions import OVERALL, check_dimension_name
from .distributed import collective_device, distributed_group
from .errors import ConfigError, DataError, SampleError
from .heads import FLOAT32_MAX, as_real, normalization_problem, real_pair
from .yamlio import load_yaml_file, load_yaml_text

__all__ = [
    "NORMALIZATIONS",
    "OVERALL",
    "CombinedReward",
    "Gate",
    "RewardCombiner",
    "RunningStats",
    "Weights",
]

NORMALIZATIONS = ("none", "fixed", "running")


def _finite32(value, what: str) -> float:
    """``value`` as a float if it is a real number (Python, numpy or a one-element torch/numpy
    value; not a bool) that is finite and within float32 range (rewards are float32), else a
    ``ConfigError`` saying which of these it is not."""
    x = as_real(value)
    if x is None:
        raise ConfigError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(x):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if abs(x) > FLOAT32_MAX:
        raise ConfigError(f"{what} = {x:g} is beyond float32 range (|value| <= {FLOAT32_MAX:.4g}); rewards are "
                          "float32")
    return x


@dataclass(frozen=True)
class Weights:
    """An ordered, immutable map ``dimension -> weight`` (at least one non-zero).

    ``pairs``: ``((name, weight), ...)`` in the order given. A weight may be any real number
    (Python, numpy, a one-element tensor; not a bool) and is stored as a float; NaN, inf and values
    beyond float32 range (the reward's dtype) are refused."""

    pairs: tuple[tuple[str, float], ...]

    def __post_init__(self):
        if isinstance(self.pairs, (str, bytes, Mapping)) or not isinstance(self.pairs, Iterable):
            raise ConfigError(f"weights pairs must be (name, weight) pairs, got {type(self.pairs).__name__}")
        pairs = tuple(self.pairs)
        if not pairs:
            raise ConfigError("weights are empty; give at least one dimension, e.g. 'overall=1'")
        seen, checked = set(), []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ConfigError(f"weights pairs must be (name, weight) pairs, got {pair!r}")
            name, w = pair
            check_dimension_name(name, "dimension name in weights")
            if name in seen:
                raise ConfigError(f"dimension {name!r} appears twice in weights")
            seen.add(name)
            checked.append((name, _finite32(w, f"weight for {name!r}")))
        object.__setattr__(self, "pairs", tuple(checked))  # every weight a float
        if all(w == 0 for _, w in self.pairs):
            raise ConfigError("all weights are zero")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, mapping: Mapping[str, float]) -> Weights:
        return cls(tuple((str(k), _finite32(v, f"weight for {k!r}")) for k, v in mapping.items()))

    @classmethod
    def from_string(cls, spec: str) -> Weights:
        """``"safety=2, clarity=1"`` (``,`` or ``;`` separated)."""
        pairs = []
        for part in re.split(r"[,;]", spec):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(f"weights {spec!r}: expected name=value, got {part!r}")
            name, value = (s.strip() for s in part.split("=", 1))
            try:
                pairs.append((name, float(value)))
            except ValueError:
                raise ConfigError(f"weights {spec!r}: {value!r} is not a number (for {name!r})") from None
        return cls(tuple(pairs))

    @classmethod
    def from_yaml_text(cls, text: str, where: str) -> Weights:
        """A YAML document ``{weights: {dim: w, ...}}`` (or the mapping at top level)."""
        return cls._from_yaml_data(load_yaml_text(text, where), where)

    @classmethod
    def _from_yaml_data(cls, data, where: str) -> Weights:
        """``{weights: {dim: w, ...}, description: "..."}`` or ``{dim: w, ...}``, every field checked:
        errors name the file (``where``) and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of dimension -> weight (or 'weights:' holding one), "
                              f"got {type(data).__name__}")
        if "weights" in data:
            unknown = sorted(str(k) for k in data if k not in ("weights", "description"))
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {unknown} beside 'weights' (a weights file holds "
                                  "'weights' and an optional 'description')")
            if data.get("description") is not None and not isinstance(data["description"], str):
                raise ConfigError(f"{where}: field 'description' must be a string, got "
                                  f"{type(data['description']).__name__}")
            data = data["weights"]
            if not isinstance(data, dict):
                raise ConfigError(f"{where}: field 'weights' must be a mapping of dimension -> weight, got "
                                  f"{type(data).__name__} {data!r:.60}")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where}: dimension names must be strings, got {bad!r:.80}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def preset(cls, name: str) -> Weights:
        """The weights preset ``name`` (:func:`~multitap_rl.presets.list_presets`), never a file of
        that name in the working directory; a ``ConfigError`` if there is none or it is broken."""
        from .presets import list_presets, preset_text

        found = preset_text("weights", name)
        if found is None:
            raise ConfigError(f"no weights preset {name!r}; presets: {list_presets('weights')}")
        return cls.from_yaml_text(found[1], found[0])

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Weights:
        return cls._from_yaml_data(load_yaml_file(path), str(path))

    @classmethod
    def parse(cls, spec: Weights | Mapping[str, float] | str | os.PathLike | None) -> Weights:
        """Any accepted form; ``None`` means ``overall=1``. A string is a file path if it exists,
        a preset name if one of that name exists, else ``name=value`` pairs."""
        from .presets import list_presets, preset_text

        if spec is None:
            return cls(((OVERALL, 1.0),))
        if isinstance(spec, Weights):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "=" not in spec):
            path = Path(spec).expanduser()
            if path.is_file():
                return cls.from_yaml(path)
            found = preset_text("weights", spec) if isinstance(spec, str) else None
            if found is not None:
                return cls.from_yaml_text(found[1], found[0])
            raise ConfigError(f"weights {os.fspath(spec)!r}: no such file or preset, and not 'name=value' pairs; "
                              f"presets: {list_presets('weights')}")
        if isinstance(spec, str):
            return cls.from_string(spec)
        raise ConfigError(f"weights must be a dict, a string, a path or Weights, got {type(spec).__name__}")

    # -- access --------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.pairs)

    def items(self) -> tuple[tuple[str, float], ...]:
        return self.pairs

    def as_dict(self) -> dict[str, float]:
        return dict(self.pairs)

    def check(self, available: Iterable[str]) -> None:
        """Raise ``ConfigError`` naming any dimension not in ``available`` and listing the valid ones."""
        available = list(available)
        unknown = [n for n in self.names if n not in available]
        if unknown:
            raise ConfigError(
                f"unknown dimension(s) {unknown} in weights; valid names: {available}"
                + ("" if len(available) > 1 else " (load stage-2 heads for more dimensions)")
            )

    def __str__(self) -> str:
        return ",".join(f"{n}={w:g}" for n, w in self.pairs)


_GATE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*<\s*([-+0-9.eE]+)\s*(?::\s*(cap|penalty)\s*=\s*([-+0-9.eE]+))?\s*$")


@dataclass(frozen=True)
class Gate:
    """If ``dim`` (raw value) is below ``threshold``: ``mode="cap"`` limits the reward to at most
    ``value``; ``mode="penalty"`` subtracts ``value`` from it."""

    dim: str
    threshold: float
    mode: str = "cap"
    value: float = 0.0

    def __post_init__(self):
        check_dimension_name(self.dim, "gate dimension")
        if self.mode not in ("cap", "penalty"):
            raise ConfigError(f"gate mode must be 'cap' or 'penalty', got {self.mode!r}")
        for n in ("threshold", "value"):  # any real number, stored as a float
            object.__setattr__(self, n, _finite32(getattr(self, n), f"gate {n}"))

    @classmethod
    def parse(cls, spec: Gate | Mapping | str) -> Gate:
        """A Gate, a dict, or ``"safety<0.5:cap=0"`` / ``"safety<0.5:penalty=1"``."""
        if isinstance(spec, Gate):
            return spec
        if isinstance(spec, Mapping):
            try:
                return cls(**spec)
            except TypeError as exc:
                raise ConfigError(f"gate {dict(spec)!r}: {exc} (keys: dim, threshold, mode, value)") from None
        if not isinstance(spec, str):
            raise ConfigError(f"a gate must be a string like 'safety<0.5:cap=0', a dict or a Gate, got "
                              f"{type(spec).__name__}")
        m = _GATE.match(spec)
        if not m:
            raise ConfigError(f"gate {spec!r}: expected 'dim<threshold[:cap=v|:penalty=v]'")
        try:
            return cls(m.group(1), float(m.group(2)), m.group(3) or "cap", float(m.group(4) or 0.0))
        except ValueError:
            raise ConfigError(f"gate {spec!r}: threshold and value must be numbers") from None

    @classmethod
    def parse_all(cls, gates) -> list[Gate]:
        """One gate (a string, dict or Gate) or a sequence of them."""
        if gates is None:
            return []
        if isinstance(gates, (str, Gate, Mapping)):
            gates = [gates]
        if not isinstance(gates, Iterable):
            raise ConfigError(f"gates must be a gate or a list of gates, got {type(gates).__name__}")
        return [cls.parse(g) for g in gates]


class RunningStats:
    """Exponential moving mean/variance per dimension (for ``normalize="running"`` in RL).

    Each :meth:`update` takes one batch per dimension: its moments ``(n, mean, M2)`` are combined
    over all ranks when ``torch.distributed`` is initialised (every rank then holds the same
    statistics; all ranks must call :meth:`update` together, with empty batches where a rank has
    no sample), and the EMA moves by ``1 - momentum`` toward the global batch. ``group``: the
    process group (default: all ranks); ``False`` keeps statistics per process."""

    def __init__(self, momentum: float = 0.99, eps: float = 1e-6, group=None):
        m = as_real(momentum)
        if m is None or not 0.0 <= m < 1.0:
            raise ConfigError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum, self.eps, self.group = m, eps, group
        self.mean: dict[str, float] = {}
        self.var: dict[str, float] = {}

    def _global_moments(self, batches: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
        """``{name: (n, mean, M2)}`` of each dimension over this batch on every rank (float64)."""
        local = torch.zeros(len(batches), 3, dtype=torch.float64)
        for k, v in enumerate(batches.values()):
            v = v.detach().double().cpu().reshape(-1)
            if v.numel():
                m = float(v.mean())
                local[k] = torch.tensor([v.numel(), m, float(((v - m) ** 2).sum())], dtype=torch.float64)
        group = distributed_group(self.group)
        if group is None:
            parts = [local]
        else:
            import torch.distributed as dist

            dev = collective_device(group)  # CPU for gloo, the rank's GPU for NCCL
            parts = [torch.empty_like(local, device=dev) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, local.to(dev), group=group)
            parts = [p.cpu() for p in parts]
        out = {}
        for k, name in enumerate(batches):
            n, mean, m2 = 0.0, 0.0, 0.0
            for part in parts:  # Chan et al.'s pairwise combination, in rank order on every rank
                nb, mb, m2b = (float(x) for x in part[k])
                if nb == 0:
                    continue
                tot = n + nb
                delta = mb - mean
                mean += delta * nb / tot
                m2 += m2b + delta * delta * n * nb / tot
                n = tot
            out[name] = (n, mean, m2)
        return out

    def update_many(self, batches: Mapping[str, torch.Tensor]) -> None:
        """One update of every dimension in ``batches`` (one collective call when distributed)."""
        if not batches:
            return
        a = self.momentum
        for name, (n, m, m2) in self._global_moments(dict(batches)).items():
            if n == 0:
                continue
            v = m2 / n
            if name not in self.mean:
                self.mean[name], self.var[name] = m, v
                continue
            old = self.mean[name]
            self.mean[name] = a * old + (1 - a) * m
            # variance of the a : (1 - a) mixture of the old and the batch distribution about the new mean
            self.var[name] = a * self.var[name] + (1 - a) * v + a * (1 - a) * (m - old) ** 2

    def update(self, name: str, values: torch.Tensor) -> None:
        self.update_many({name: values})

    def normalize(self, name: str, values: torch.Tensor) -> torch.Tensor:
        if name not in self.mean:
            if values.numel() == 0:
                return values
            raise DataError(f"running statistics of {name!r} are empty: update them before normalising")
        return (values - self.mean[name]) / math.sqrt(self.var[name] + self.eps)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "mean": dict(self.mean), "var": dict(self.var)}

    def __getstate__(self):  # a process group does not travel; the default group is found again
        state = dict(self.__dict__)
        if not (self.group is None or isinstance(self.group, bool)):
            state["group"] = None
        return state


@dataclass
class CombinedReward:
    """``reward``: (N,) float32 on the scores' device, differentiable when they are. ``dims``: every
    dimension's raw (N,) values (detached). ``normalized``: the weighted dimensions after
    normalisation (detached). ``gated``: (N,) bool, True where a gate fired."""

    reward: torch.Tensor
    dims: dict[str, torch.Tensor]
    normalized: dict[str, torch.Tensor] = field(default_factory=dict)
    gated: torch.Tensor | None = None


def _vector(name: str, v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v
    else:
        try:
            t = torch.as_tensor(v, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"dimension {name!r}: expected a tensor or a sequence of numbers, got "
                            f"{type(v).__name__}") from None
    if not t.is_floating_point():
        t = t.float()
    if t.dim() > 1 and all(s == 1 for s in t.shape[1:]):
        t = t.reshape(t.shape[0])
    if t.dim() != 1:
        raise DataError(f"dimension {name!r}: expected one value per sample, got shape {tuple(t.shape)}")
    return t


def _fixed_stats(name: str, value) -> tuple[float, float]:
    """``(mean, std)`` of dimension ``name`` for fixed normalisation: two real numbers whose
    ``(x - mean) / std`` is finite in float32 for scores of ordinary size
    (:func:`~multitap_rl.heads.normalization_problem`), else a ``ConfigError`` naming the dimension."""
    pair = real_pair(value)
    if pair is None:
        raise ConfigError(f"fixed normalisation of {name!r}: stats must be (mean, std), two numbers, got {value!r}")
    problem = normalization_problem(pair[0], pair[1], (0.0, 1.0) if name == OVERALL else None)
    if problem:
        raise ConfigError(f"fixed normalisation of {name!r}: needs a finite mean and a std > 0 that keep "
                          f"(x - mean) / std finite in float32, got ({pair[0]}, {pair[1]}): {problem}")
    return pair[0], pair[1]


def _check_finite(values: torch.Tensor, name: str, what: str) -> None:
    """A ``SampleError`` naming the first sample (its index in this call) whose ``values`` entry is
    not finite: float32 overflow in normalising or weighting is that sample's error, never an inf."""
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise SampleError(i, "score", f"{name}: {what} is not finite in float32 ({float(values[i].detach())})")


class RewardCombiner:
    """Weights + normalisation + gates over named per-sample scores.

    Args:
        weights: anything :meth:`Weights.parse` accepts.
        available: the dimension names the scorer produces (``overall`` + head dimensions).
        normalize: "none" | "fixed" (z-score with ``stats[dim] = (mean, std)``, e.g. from the
            heads' training statistics) | "running" (EMA mean/variance updated on every call,
            shared across ranks under torch.distributed).
        gates: :class:`Gate` specs (one, or a list), applied after weighting in the order given.
        momentum: EMA momentum of ``normalize="running"``.
    """

    def __init__(self, weights=None, available: Sequence[str] = (OVERALL,), *, normalize: str = "none",
                 stats: Mapping[str, tuple[float, float]] | None = None, gates: Sequence = (),
                 momentum: float = 0.99):
        self.weights = Weights.parse(weights)
        self.available = list(available)
        self.weights.check(self.available)
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        self.gates = Gate.parse_all(gates)
        for g in self.gates:
            if g.dim not in self.available:
                raise ConfigError(f"gate on unknown dimension {g.dim!r}; valid names: {self.available}")
        if stats is not None and not isinstance(stats, Mapping):
            raise ConfigError(f"stats must map dimension -> (mean, std), got {type(stats).__name__}")
        self.stats = dict(stats or {})
        if normalize == "fixed":
            missing = [n for n in self.weights.names if n not in self.stats]
            if missing:
                raise ConfigError(f"normalize='fixed' needs (mean, std) for {missing}; the heads file stores them "
                                  "for its dimensions (use 'none' or 'running' otherwise)")
            for n in self.weights.names:  # only the weighted dimensions are divided by their std
                self.stats[n] = _fixed_stats(n, self.stats[n])
        self.running = RunningStats(momentum) if normalize == "running" else None

    def __call__(self, dims: Mapping[str, torch.Tensor]) -> CombinedReward:
        """Combine ``{dimension: (N,) values}``. Tensors keep their device and autograd graph in the
        reward; sequences of numbers are read as float32 CPU tensors. Every rank must call this
        together under ``normalize="running"`` with torch.distributed (N may be 0 on a rank)."""
        # 1. Validate: every weighted (and gated) dimension present, N values each, all finite.
        needed = list(dict.fromkeys([*self.weights.names, *(g.dim for g in self.gates)]))
        missing = [n for n in needed if n not in dims]
        if missing:
            raise DataError(f"scores lack dimension(s) {missing}; got {list(dims)}")
        raw = {k: _vector(k, v) for k, v in dims.items()}
        first = raw[self.weights.names[0]]
        n, device = first.shape[0], first.device
        for k, v in raw.items():
            if v.shape[0] != n:
                raise DataError(f"dimension {k!r} has {v.shape[0]} values, expected {n}")
            finite = torch.isfinite(v.detach())
            if not bool(finite.all()):
                raise DataError(f"dimension {k!r} is not finite at sample {int((~finite).nonzero()[0])}")
        # 2. Running statistics: one (synchronised) update from detached values.
        if self.running is not None:
            self.running.update_many({name: raw[name].detach() for name in self.weights.names})
        # 3. Weighted sum of the normalised dimensions, on the scores' device.
        reward = torch.zeros(n, dtype=torch.float32, device=device)
        normalized = {}
        for name, w in self.weights.items():
            v = raw[name].float().to(device)
            if self.normalize == "fixed":
                mean, std = self.stats[name]
                v = (v - mean) / std
                _check_finite(v, name, f"the normalised value (x - {mean:g}) / {std:g}")
            elif self.normalize == "running" and n:
                v = self.running.normalize(name, v)
                _check_finite(v, name, "the value normalised with running statistics")
            normalized[name] = v.detach()
            reward = reward + w * v
        # 4. Gates on the raw values: a cap is a constant (no gradient), a penalty keeps it.
        gated = torch.zeros(n, dtype=torch.bool, device=device)
        for g in self.gates:
            low = raw[g.dim].detach().to(device) < g.threshold
            gated |= low
            if g.mode == "cap":
                reward = torch.where(low, torch.clamp(reward, max=g.value), reward)
            else:
                reward = torch.where(low, reward - g.value, reward)
        _check_finite(reward, "reward", "the weighted sum " + " + ".join(f"{w:g}*{k}" for k, w in self.weights.items()))
        return CombinedReward(reward=reward, dims={k: v.detach() for k, v in raw.items()}, normalized=normalized,
                              gated=gated)
