"""The one reward core every adapter wraps: a model spec, a scorer, a combiner, one call.

* :func:`resolve_model` -- ``model_or_spec`` (a loaded ``MultiTapModel``, a
  :class:`~multitap_rl.spec.ModelSpec`, or a checkpoint path / hub id) -> ``(spec, model or None)``.
  Reward callables carry only the spec across processes, never the model.
* :class:`Scorer` -- one model per spec and process, loaded lazily on that process's device; it
  offloads between calls (``spec.offload``) and gathers a sharded model for each call
  (``spec.shard``). It keeps no results: a result cache lives only as long as one trainer step's
  set of callables (:class:`StepCache`), so it cannot go stale.
* :class:`RewardCore` -- spec + scorer + :class:`~multitap_rl.combiner.RewardCombiner` and the
  one core call, :meth:`RewardCore.evaluate`: N samples (some already known to be invalid) ->
  a :class:`RewardBatch` with the weighted reward, every dimension and every sample's error,
  full length. Adapters only translate their trainer's inputs and outputs.

Lifetime: a scorer made from an in-memory ``MultiTapModel`` lives as long as a reward made from it
(the registry holds such scorers weakly); scorers loaded from a spec stay for the process
(loading twice would cost minutes on a real model).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from multitap_rl.errors import ON_INVALID, CheckpointError, ConfigError, HeadsError, SampleError, check_on_invalid
from multitap_rl.spec import ModelSpec

__all__ = [
    "REWARD_KWARGS",
    "CoreReward",
    "RewardBatch",
    "RewardCore",
    "Scorer",
    "StepCache",
    "core_from_kwargs",
    "forget_scorers",
    "get_scorer",
    "resolve_model",
]

logger = logging.getLogger(__name__)


# -- which model -----------------------------------------------------------------------------------
def _instance_token(model) -> str:
    token = getattr(model, "_multitap_reward_token", None)
    if token is None:
        token = uuid.uuid4().hex
        model._multitap_reward_token = token
    return token


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # "org/name", as the loader fetches


def _check_local_paths(spec: ModelSpec) -> None:
    """Refuse, when the reward is made, a spec whose checkpoint or base model is a local path
    (anything not shaped like a hub id ``org/name``: absolute, ``./``, ``../``, ``~``, deeper
    relative paths) or whose heads directory does not exist -- a ``CheckpointError`` /
    ``HeadsError`` naming the path, instead of a failure at the first reward call inside a running
    trainer. Hub ids stay lazy (fetched, or refused offline, when the model loads); a served
    reward's URL and a spec taken from an in-memory model are not checked."""
    if spec.is_remote or spec.instance is not None:
        return
    for field_name, what, error in (("checkpoint", "checkpoint", CheckpointError),
                                    ("base_model", "base model", CheckpointError), ("heads", "heads", HeadsError)):
        name = getattr(spec, field_name)
        if name is None or (field_name != "heads" and _HUB_ID.fullmatch(name)):
            continue
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            kind = "" if field_name == "heads" else ", and not a hub id of the form 'org/name'"
            raise error(f"{what} {name!r}: no such file or directory ({os.path.abspath(path)}){kind}")


def resolve_model(model_or_spec, *, base_model=None, heads=None) -> tuple[ModelSpec, object | None]:
    """``(spec, already-loaded model or None)`` for what a reward factory was given.

    * a ``MultiTapModel``: its own spec (``model.spec``), marked with a token unique to that object
      (and its heads when they were attached as an object), so it reloads in other processes
      after pickling -- from its checkpoint, with the same settings and heads;
    * a :class:`ModelSpec`: as is;
    * a path or hub id: ``ModelSpec(checkpoint=..., base_model=..., heads=...)`` with every other
      setting at its default (build a ``ModelSpec`` for device, dtype, engine limits, offload, shard);
    * a served reward's URL (``http(s)://host:port``, several comma-separated): scored through
      :class:`reward_fns.remote.RemoteScorer`.

    ``base_model`` and ``heads`` are conveniences beside a path only. A spec's or a path's local
    paths that do not exist are refused here, when the reward is made (``CheckpointError``,
    ``HeadsError``); hub ids load, or fail, lazily."""
    from multitap_rl.model import MultiTapModel

    extra = {k: v for k, v in (("base_model", base_model), ("heads", heads)) if v is not None}
    if isinstance(model_or_spec, MultiTapModel):
        if extra:
            raise ConfigError(f"{sorted(extra)} apply when loading from a path; the MultiTapModel passed is already "
                              "loaded (attach heads with model.load_heads)")
        model = model_or_spec
        heads_state = model.heads.to_bytes() if model.heads is not None and model.spec.heads is None else None
        return model.spec.replace(instance=_instance_token(model), heads_state=heads_state), model
    if isinstance(model_or_spec, ModelSpec):
        if extra:
            raise ConfigError(f"{sorted(extra)} go into the ModelSpec (ModelSpec(..., base_model=..., heads=...))")
        _check_local_paths(model_or_spec)
        return model_or_spec, None
    if isinstance(model_or_spec, (str, os.PathLike)):
        spec = ModelSpec(checkpoint=os.fspath(model_or_spec), **extra)
        _check_local_paths(spec)
        return spec, None
    raise ConfigError(f"model_or_spec must be a MultiTapModel, a ModelSpec, a directory or a hub id, got "
                      f"{type(model_or_spec).__name__}")


# -- the scorer ------------------------------------------------------------------------------------
class Scorer:
    """One model for a spec in this process: loaded lazily, offloaded between calls, gathered for
    each call when sharded. ``score`` is ``MultiTapModel.score`` under those rules."""

    def __init__(self, spec: ModelSpec, model=None):
        self.spec = spec
        self._model = model
        self._home = None if model is None else model.device  # where the model computes
        self._lock = threading.Lock()

    @property
    def model(self):
        if self._model is None:
            logger.info("loading MULTI-TAP reward model %s (once per process)", self.spec.checkpoint)
            from multitap_rl.model import MultiTapModel

            model = MultiTapModel.from_spec(self.spec)
            if self.spec.shard == "zero3":
                from multitap_rl.sharding import shard_zero3

                shard_zero3(model)
            self._model, self._home = model, model.device
            if self.spec.offload:
                model.to("cpu")
        return self._model

    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None, *,
              on_invalid: str = "raise"):
        """A :class:`~multitap_rl.model.ScoreOutput` (float32 CPU). A sharded model is gathered for
        the call, a collective: every rank must call together."""
        with self._lock:
            model = self.model
            if self.spec.offload and model.device != self._home:
                model.to(self._home)
            try:
                if self.spec.shard is None:
                    return model.score(images, texts, questions, on_invalid=on_invalid)
                from multitap_rl.sharding import gathered

                with gathered(model):
                    return model.score(images, texts, questions, on_invalid=on_invalid)
            finally:
                if self.spec.offload and self._home.type != "cpu":
                    model.to("cpu")


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # specs of in-memory models
_LOADED: dict[ModelSpec, Scorer] = {}  # specs loaded in this process: one model per spec
_LOCK = threading.Lock()


def get_scorer(spec: ModelSpec, model=None):
    """The process's scorer for ``spec`` (made on first use; ``model``: the already-loaded model): a
    :class:`Scorer`, or a :class:`~reward_fns.remote.RemoteScorer` for a served reward's URL."""
    with _LOCK:
        scorer = _LOADED.get(spec) or _SHARED.get(spec)
        if scorer is None:
            if spec.is_remote:
                from .remote import RemoteScorer

                scorer = RemoteScorer(spec)
            else:
                scorer = Scorer(spec, model)
            if model is None:
                _LOADED[spec] = scorer
            else:
                _SHARED[spec] = scorer
        return scorer


def forget_scorers() -> None:
    """Drop the process's scorer registry (as a fresh process would start): later calls load
    models again from their specs. Rewards that hold a scorer keep it."""
    with _LOCK:
        _SHARED.clear()
        _LOADED.clear()
        _CORES.clear()


# -- one result per trainer step -------------------------------------------------------------------
class StepCache:
    """The result of one batch, shared by a set of callables made together (one TRL step calls
    each of them once with the same batch): the first computes, each of the others takes it, and
    once every member has taken it the result is dropped. A member that calls again before the
    others -- a new step -- computes anew. While the result lives it holds the batch's own input
    objects and a snapshot of each list's items, and serves only the very same objects holding the
    very same items (an edited list, or another batch, computes anew)."""

    def __init__(self, members: int):
        self.members = members
        self._lock = threading.Lock()
        self._entry = None  # (inputs, result, set of members that took it)

    def get(self, member: int, inputs: tuple, compute):
        """The batch's result for ``member``: taken from the set's entry when it holds ``inputs``
        (a tuple of the batch's input objects), else ``compute()``."""
        inputs = tuple((x, tuple(x) if isinstance(x, list) else None) for x in inputs)
        with self._lock:
            entry = self._entry
            if entry is not None and member not in entry[2] and _same_inputs(entry[0], inputs):
                entry[2].add(member)
                if len(entry[2]) == self.members:
                    self._entry = None
                return entry[1]
            result = compute()
            self._entry = None if self.members == 1 else (inputs, result, {member})
            return result

    def __getstate__(self):  # a result never travels: each process computes its own
        return {"members": self.members}

    def __setstate__(self, state):
        self.__init__(state["members"])


def _same_inputs(a: tuple, b: tuple) -> bool:
    """The same objects, and lists holding the same item objects as when the entry was made."""
    def same(x, y):
        (ox, items_x), (oy, items_y) = x, y
        return ox is oy and (items_x is None or (len(items_x) == len(items_y)
                                                 and all(p is q for p, q in zip(items_x, items_y))))

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


# -- the core --------------------------------------------------------------------------------------
@dataclass
class RewardBatch:
    """What :meth:`RewardCore.evaluate` returns for N samples, each field full length.

    ``reward``: (N,) float32, the weighted reward (None without a combiner); ``scores``: every
    dimension's raw (N,) float32 values, ``"overall"`` first; ``normalized``: the weighted
    dimensions after normalisation; ``gated``: (N,) bool where a gate fired (None without gates).
    Invalid samples are NaN (False in ``gated``); ``errors`` says why, by sample index; ``fill``
    is what they get (``on_invalid``: None for "skip"). Samples the adapter set ``aside`` are NaN
    too, and neither valid nor errors (the adapter gives them their value)."""

    reward: torch.Tensor | None
    scores: dict[str, torch.Tensor]
    errors: dict[int, SampleError] = field(default_factory=dict)
    normalized: dict[str, torch.Tensor] = field(default_factory=dict)
    gated: torch.Tensor | None = None
    fill: float | None = None
    aside: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.scores["overall"].shape[0])

    @property
    def valid(self) -> torch.Tensor:
        """(N,) bool: True where the sample was scored."""
        mask = torch.ones(len(self), dtype=torch.bool)
        mask[[*self.errors, *self.aside]] = False
        return mask

    def values(self, name: str | None = None) -> list[float | None]:
        """The reward (``name=None``) or one dimension as a list, invalid samples given ``fill``."""
        col = self.reward if name is None else self.scores[name]
        return [self.fill if i in self.errors else v for i, v in enumerate(col.tolist())]

    def tensor(self) -> torch.Tensor:
        """The reward as a (N,) float32 tensor, invalid samples given ``fill`` (a float here)."""
        out = self.reward.clone()
        if self.errors:
            out[list(self.errors)] = float(self.fill)
        return out


class RewardCore:
    """Spec + scorer + combiner + the invalid-sample policy; see the module docstring.

    Args:
        model_or_spec: a loaded ``MultiTapModel``, a :class:`~multitap_rl.spec.ModelSpec`, or a
            MULTI-TAP checkpoint (directory or hub id) loaded lazily, once per process, on that
            process's device; ``base_model``/``heads`` beside a path (see :func:`resolve_model`).
        weights, normalize, gates, momentum: the :class:`~multitap_rl.combiner.RewardCombiner`
            (``combine=False``: none, for per-dimension rewards).
        on_invalid: what a sample that cannot be scored (bad image, a text the prompt cannot hold,
            a non-finite score) gets: ``"raise"`` (a ``SampleError`` naming it), ``"skip"`` (no
            value: ``None``/NaN) or a float; ``invalid_options`` restricts the strings an adapter
            accepts. Invalid samples are counted (:attr:`invalid_total`) and warned about once.
    """

    def __init__(self, model_or_spec, *, base_model=None, heads=None, weights=None, normalize: str = "none",
                 gates: Sequence = (), momentum: float = 0.99, on_invalid="raise", combine: bool = True,
                 invalid_options: Sequence[str] = ON_INVALID):
        from multitap_rl.combiner import RewardCombiner

        self.spec, model = resolve_model(model_or_spec, base_model=base_model, heads=heads)
        self.on_invalid = check_on_invalid(on_invalid, invalid_options)
        self.dimension_names, stats = _dimension_names(self.spec, model)
        self.combiner = RewardCombiner(weights, self.dimension_names, normalize=normalize, stats=stats, gates=gates,
                                       momentum=momentum) if combine else None
        self._scorer = get_scorer(self.spec, model) if model is not None else None
        self.invalid_total = 0
        self._warned = False

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = get_scorer(self.spec)
        return self._scorer

    @property
    def model(self):
        return self.scorer.model

    def __getstate__(self):  # the model stays in its process: only the spec and settings travel
        state = dict(self.__dict__)
        state["_scorer"] = None
        return state

    @property
    def fill(self) -> float | None:
        """What an invalid sample gets: None ("skip"), the float, or None under "raise" (none are)."""
        return self.on_invalid if isinstance(self.on_invalid, float) else None

    def evaluate(self, images: Sequence, texts: Sequence, questions: Sequence | None = None, *,
                 invalid: dict[int, SampleError] | None = None, aside: Sequence[int] = (),
                 unit: str | None = None, name=None) -> RewardBatch:
        """The one core call: score N samples in one engine call, apply ``on_invalid``, combine.

        Args:
            images, texts, questions: N samples (questions None: the caption task).
            invalid: samples the adapter already found invalid (index -> error); they are not scored.
            aside: samples not to score, that are not errors either (the adapter values them).
            unit: what the index counts in error messages (``"completion"``, ``"image"``, ...).
            name: ``index -> (index, unit, detail)`` to name a sample in an error instead (rerank's
                "image i, candidate j").
        Returns:
            a :class:`RewardBatch`. Under ``on_invalid="raise"`` the first invalid sample raises a
            :class:`SampleError` naming it. Runs the combiner even with no valid sample (running
            statistics are shared across ranks), and a sharded model's gather even with no sample.
        """
        # 1. Score every sample not already known to be invalid, in one call.
        n = len(texts)

        def named(exc: SampleError, i: int) -> SampleError:
            index, u, detail = name(i) if name is not None else (i, unit, "")
            return exc.at(index, unit=u, detail=detail)

        errors = {i: named(e, i) for i, e in (invalid or {}).items()}
        if errors and self.on_invalid == "raise":
            raise errors[min(errors)]
        aside = tuple(sorted(set(aside) - set(errors)))
        keep = [i for i in range(n) if i not in errors and i not in aside]
        scores = {k: torch.full((n,), float("nan")) for k in self.dimension_names}
        if keep or self.spec.shard is not None:  # a sharded model's gather is collective: always take part
            qs = None if questions is None else [questions[i] for i in keep]
            mode = "raise" if self.on_invalid == "raise" else "skip"
            try:
                out = self.scorer.score([images[i] for i in keep], [texts[i] for i in keep], qs, on_invalid=mode)
            except SampleError as exc:
                raise named(exc, keep[exc.index]) from exc
            for j, exc in out.errors.items():
                errors[keep[j]] = named(exc, keep[j])
            idx = torch.tensor(keep, dtype=torch.long)
            for k, v in out.scores.items():
                scores[k][idx] = v
        errors = dict(sorted(errors.items()))
        self._note_invalid(errors, unit or "sample")
        # 2. Combine the valid samples (also when there are none).
        batch = RewardBatch(reward=None, scores=scores, errors=errors, fill=self.fill, aside=aside)
        if self.combiner is not None:
            combined, idx = self._combine_valid(batch, named)
            batch.reward = torch.full((n,), float("nan"))
            batch.reward[idx] = combined.reward.detach().float().cpu()
            for k, v in combined.normalized.items():
                batch.normalized[k] = torch.full((n,), float("nan"))
                batch.normalized[k][idx] = v.detach().float().cpu()
            if self.combiner.gates:
                batch.gated = torch.zeros(n, dtype=torch.bool)
                batch.gated[idx] = combined.gated.cpu()
        return batch

    def _combine_valid(self, batch: RewardBatch, named):
        """The combiner over the batch's valid samples. A sample whose normalised or weighted value
        overflows is that sample's error (named by its batch index): raised, or -- when the
        combiner keeps no running statistics, so combining again changes nothing else -- set
        aside like any invalid sample and the others combined again."""
        while True:
            valid = batch.valid
            try:
                return self.combine(batch.scores, valid)
            except SampleError as exc:
                if exc.index is None:
                    raise
                i = int(valid.nonzero().reshape(-1)[exc.index])
                error = named(exc, i)
                if self.on_invalid == "raise" or self.combiner.running is not None:
                    raise error from exc
                batch.errors = dict(sorted({**batch.errors, i: error}.items()))
                for v in batch.scores.values():
                    v[i] = float("nan")
                self._note_invalid({i: error}, "sample")

    def _note_invalid(self, errors: dict[int, SampleError], where: str) -> None:
        """Count the batch's invalid samples; warn about the first batch that has any, once."""
        if not errors:
            return
        self.invalid_total += len(errors)
        if not self._warned:
            self._warned = True
            first = next(iter(errors.values()))
            logger.warning("MULTI-TAP reward: %d %s(s) of a batch could not be scored and got %r (e.g. %s); "
                           "this warning is shown once, the count is logged", len(errors), where, self.fill, first)

    def combine(self, dims: dict[str, torch.Tensor], valid: torch.Tensor | None = None):
        """``(CombinedReward over the valid samples, their indices)``; keeps the autograd graph
        (the differentiable reward calls this directly). Runs even with no valid sample."""
        if valid is None:
            idx = torch.arange(next(iter(dims.values())).shape[0])
        else:
            idx = valid.nonzero().reshape(-1)
        picked = {k: v[idx.to(v.device)] for k, v in dims.items()}
        return self.combiner(picked), idx


def _dimension_names(spec: ModelSpec, model) -> tuple[tuple[str, ...], dict]:
    """Dimension names (and the heads' normalisation stats) without loading the backbone."""
    from multitap_rl.heads import RidgeHeads

    if model is not None:
        heads = getattr(model, "heads", None)
        return tuple(model.dimension_names), dict(getattr(heads, "stats", {}) or {})
    if spec.is_remote:  # the server's dimensions and statistics (GET /info)
        scorer = get_scorer(spec)
        return scorer.dimension_names, scorer.stats
    if spec.heads_state is not None:
        heads = RidgeHeads.from_bytes(spec.heads_state)
    elif spec.heads is not None:
        heads = RidgeHeads.load(spec.heads)
    else:
        return ("overall",), {}
    return ("overall", *heads.names), dict(heads.stats)


class CoreReward:
    """Base of the reward adapters: a :class:`RewardCore` and a stable ``__name__`` (TRL logs
    rewards by it), with the core's spec, combiner, weights, dimension names and model."""

    def __init__(self, core: RewardCore, name: str):
        self.core = core
        self.__name__ = name

    @property
    def spec(self) -> ModelSpec:
        return self.core.spec

    @property
    def combiner(self):
        return self.core.combiner

    @property
    def weights(self):
        return self.core.combiner.weights

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return tuple(self.core.dimension_names)

    @property
    def scorer(self) -> Scorer:
        return self.core.scorer

    @property
    def model(self):
        return self.core.model


# -- rewards a trainer configures from YAML ----------------------------------------------------------
# The flat keywords of every function a trainer configures from its own config (verl's
# reward_kwargs, flow_grpo's scorer factories): the model's (a ModelSpec is built from them, with
# model_or_path as the checkpoint) and the reward's.
REWARD_KWARGS = ("model_or_path", "base_model", "heads", "weights", "normalize", "gates", "momentum", "on_invalid",
                 "device", "dtype", "rope", "image_size", "max_length", "offload", "max_batch_tokens",
                 "max_batch_patches", "max_images_per_chunk")
_REWARD_SETTINGS = ("weights", "normalize", "gates", "momentum", "on_invalid")
_CORES: dict[str, RewardCore] = {}


def _canonical(value):
    """A JSON-able, order-independent form of a keyword's value (the cache key's content)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def core_from_kwargs(*, invalid_options: Sequence[str] = ON_INVALID, default_on_invalid="raise",
                     **kwargs) -> RewardCore:
    """The :class:`RewardCore` of flat keywords (:data:`REWARD_KWARGS`), one per distinct settings
    and process: a trainer calling its reward function per sample builds the model, its heads and
    its combiner once. Containers from a config system (OmegaConf) are read as plain dicts/lists.

    Raises ``ConfigError`` naming an unknown keyword, or a missing ``model_or_path``."""
    unknown = sorted(set(kwargs) - set(REWARD_KWARGS))
    if unknown:
        raise ConfigError(f"unknown MULTI-TAP reward setting(s) {unknown}; valid: {list(REWARD_KWARGS)}")
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    if not kwargs.get("model_or_path"):
        raise ConfigError("the MULTI-TAP reward needs model_or_path (a checkpoint directory or hub id)")
    kwargs.setdefault("on_invalid", default_on_invalid)
    key = json.dumps({"kwargs": _canonical(kwargs), "options": list(invalid_options)}, sort_keys=True)
    with _LOCK:
        core = _CORES.get(key)
    if core is not None:
        return core
    reward = {k: kwargs.pop(k) for k in _REWARD_SETTINGS if k in kwargs}
    if "gates" in reward and reward["gates"] is None:
        reward["gates"] = ()
    spec = ModelSpec.from_kwargs(kwargs.pop("model_or_path"), **kwargs)
    core = RewardCore(spec, invalid_options=invalid_options, **reward)
    with _LOCK:
        return _CORES.setdefault(key, core)


def _plain(value):
    """OmegaConf containers (verl's config) as plain dicts and lists; anything else as it is."""
    if hasattr(value, "items") and not isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if not isinstance(value, (str, bytes)) and isinstance(value, Sequence) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value
