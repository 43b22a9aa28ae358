"""The one reward core every adapter wraps: spec + shared scorer + combiner.

* :class:`ScorerSpec` -- everything needed to (re)load the scorer in any process; small, hashable,
  picklable. Reward callables carry only this across processes, never the model.
* :class:`SharedScorer` -- one model per spec and process, loaded lazily on that process's device
  (accelerate's local process device unless one is given), bf16 on GPU. It keeps the result of its
  last batch, keyed by the batch's *content* (texts, questions, task, image contents, the model's
  weight version), so the objective callables of one TRL step share one forward -- and a batch with
  other images, edited lists or another thread's inputs never gets a stale result.
* :class:`RewardCore` -- spec + scorer + :class:`~multitap_rl.combiner.RewardCombiner` +
  per-sample isolation (``on_invalid``): what the TRL callables, DDPO, the differentiable reward,
  the PPO-style scorer and rerank all wrap.

Lifetime: a scorer made from an in-memory ``MultiTapModel`` lives as long as a reward made from it
(the module-level registry holds such scorers weakly); scorers the registry loaded from a path
stay for the process (loading twice would cost minutes on a real model).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multitap_rl.errors import ConfigError, SampleError

__all__ = [
    "ON_INVALID",
    "CoreReward",
    "RewardCore",
    "ScorerSpec",
    "SharedScorer",
    "check_on_invalid",
    "dimension_names",
    "forget_scorers",
    "get_scorer",
    "spec_for",
]

logger = logging.getLogger(__name__)

ON_INVALID = ("raise", "none")  # or a finite float: the reward of a sample that cannot be scored


def check_on_invalid(value, allowed: Sequence[str] = ON_INVALID, allow_float: bool = True):
    """``value`` if it is one of ``allowed`` or (``allow_float``) a finite number, else a ConfigError."""
    if isinstance(value, str):
        if value in allowed:
            return value
    elif allow_float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    options = " | ".join(repr(a) for a in allowed) + (" | a finite float" if allow_float else "")
    raise ConfigError(f"on_invalid must be {options}, got {value!r}")


@dataclass(frozen=True)
class ScorerSpec:
    """Everything needed to (re)load the scorer in any process. Hashable."""

    checkpoint: str | None
    base_model: str | None = None
    heads: str | None = None
    device: str | None = None
    dtype: str | None = None
    rope: str | None = None
    max_batch_tokens: int = 8192
    offload: bool = False  # keep the model on CPU between calls (frees GPU memory for the policy)
    image_size: int | None | str = "auto"  # "auto": the checkpoint's own setting (else 560)
    max_length: int | None | str = "auto"  # "auto": the checkpoint's own setting (else 1024)
    # A random token of the in-memory model this spec was made from (stored on the model), so two
    # model objects never share a scorer; in another process no model carries it, and the spec
    # loads from `checkpoint` with that model's backbone options and heads.
    instance: str | None = None
    backbone_options: tuple[tuple[str, Any], ...] | None = None
    heads_state: tuple[str, bytes] | None = None  # RidgeHeads.to_bytes() of in-memory heads
    # "zero3": the model's parameters are partitioned over the ranks (DeepSpeed ZeRO-3) and gathered
    # for each call (multitap_rl.sharding); every rank must then call the reward equally often.
    shard: str | None = None


def _digest_image(h, obj) -> None:
    """Feed one input image into ``h`` by content, without decoding it (a path by its file's bytes)."""
    from PIL import Image

    if isinstance(obj, Image.Image):
        from multitap_rl.images import image_key

        h.update(b"pil" + image_key(obj))
    elif isinstance(obj, (str, os.PathLike)):
        try:
            with open(os.fspath(obj), "rb") as fh:
                h.update(b"file" + hashlib.blake2b(fh.read(), digest_size=16).digest())
        except OSError:
            h.update(b"unreadable:" + os.fspath(obj).encode())
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        h.update(b"bytes" + hashlib.blake2b(bytes(obj), digest_size=16).digest())
    elif isinstance(obj, dict):
        _digest_image(h, obj.get("bytes") if obj.get("bytes") is not None else obj.get("path"))
    elif hasattr(obj, "detach") or hasattr(obj, "__array__"):
        import numpy as np

        arr = obj.detach().cpu().float().numpy() if hasattr(obj, "detach") else np.asarray(obj)
        arr = np.ascontiguousarray(arr)
        h.update(f"arr{arr.dtype}{arr.shape}".encode() + hashlib.blake2b(arr.tobytes(), digest_size=16).digest())
    else:
        h.update(f"other:{type(obj).__name__}:{obj!r}".encode())


class SharedScorer:
    """Lazily loaded model + a one-batch result cache keyed by content (see the module docstring)."""

    def __init__(self, spec: ScorerSpec, model=None):
        self.spec = spec
        self._model = model
        self._home = None if model is None else model.device  # where the model computes
        self._lock = threading.Lock()
        self._cache_key: bytes | None = None
        self._cache_value = None

    # -- model ---------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            from multitap_rl.model import MultiTapModel
            from multitap_rl.scoring import EngineConfig

            s = self.spec
            if s.checkpoint is None:
                raise ConfigError(
                    "this reward was made from an in-memory MultiTapModel that has no checkpoint (e.g. "
                    "from_base_model, trained here), and this process cannot see that model; save it with "
                    "model.save_pretrained(dir) and build the reward from dir"
                )
            logger.info("loading MULTI-TAP reward model %s (once per process)", s.checkpoint)
            model = MultiTapModel.from_pretrained(
                s.checkpoint, base_model=s.base_model, heads=s.heads, device=s.device, dtype=s.dtype,
                rope=s.rope, image_size=s.image_size, max_length=s.max_length,
                engine=EngineConfig(max_batch_tokens=s.max_batch_tokens),
                backbone_options=None if s.backbone_options is None else dict(s.backbone_options),
            )
            if s.heads_state is not None:
                from multitap_rl.heads import RidgeHeads

                model.load_heads(RidgeHeads.from_bytes(s.heads_state))
            if s.shard == "zero3":
                from multitap_rl.sharding import shard_zero3

                shard_zero3(model)
            self._model = model
            self._home = self._model.device
            if s.offload:
                self._model.to("cpu")
        return self._model

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return tuple(self.model.dimension_names)

    def _onload(self):
        model = self.model
        if self.spec.offload and model.device != self._home:
            model.to(self._home)
        return model

    def _offload(self):
        if self.spec.offload and self._model is not None and self._home.type != "cpu":
            self._model.to("cpu")

    # -- scoring --------------------------------------------------------------------------------
    def _key(self, model, images, texts, questions, on_error: str) -> bytes:
        h = hashlib.blake2b(digest_size=32)
        params = model.parameters() if hasattr(model, "parameters") else ()
        version = sum(p._version for p in params)  # in-place weight updates change it
        h.update(f"{id(model)}|{version}|{on_error}|{len(texts)}\n".encode())
        for i, text in enumerate(texts):
            h.update(f"t{len(text) if isinstance(text, str) else -1}:".encode())
            h.update(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else repr(text).encode())
            q = None if questions is None else questions[i]
            h.update(b"|q:" + (q.encode("utf-8", "surrogatepass") if isinstance(q, str) else repr(q).encode()))
            _digest_image(h, images[i])
            h.update(b"\n")
        return h.digest()

    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None, *,
              on_error: str = "raise"):
        """A :class:`~multitap_rl.model.ScoreOutput` (float32 CPU). A repeated call with the same
        content (texts, questions, images, model weights) returns the cached result: the
        callables of one TRL step share one forward.

        A sharded model (``spec.shard``) is gathered for the call, a collective: every rank must
        call together, and a cached result is used only when it is cached on every rank."""
        with self._lock:
            model = self._onload()
            try:
                key = self._key(model, images, texts, questions, on_error)
                hit = key == self._cache_key
                if self.spec.shard is not None:
                    from multitap_rl.distributed import all_true

                    hit = all_true(hit)
                if hit:
                    return self._cache_value
                if self.spec.shard is None:
                    out = model.score(images, texts, questions, on_error=on_error)
                else:
                    from multitap_rl.sharding import gathered

                    with gathered(model):
                        out = model.score(images, texts, questions, on_error=on_error)
            finally:
                self._offload()
            self._cache_key, self._cache_value = key, out
            return out


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # specs of in-memory models
_LOADED: dict[ScorerSpec, SharedScorer] = {}  # specs loaded from a path: one model per process
_LOCK = threading.Lock()


def get_scorer(spec: ScorerSpec, model=None) -> SharedScorer:
    """The process's scorer for ``spec`` (made on first use; ``model``: the already-loaded model)."""
    with _LOCK:
        scorer = _LOADED.get(spec) or _SHARED.get(spec)
        if scorer is None:
            scorer = SharedScorer(spec, model)
            if spec.instance is None or model is None:
                _LOADED[spec] = scorer
            else:
                _SHARED[spec] = scorer
        elif model is not None and scorer._model is None:
            scorer._model, scorer._home = model, model.device
        return scorer


def forget_scorers() -> None:
    """Drop the process's scorer registry (as a fresh process would start): later calls load
    models again from their specs. Rewards that hold a scorer keep it."""
    with _LOCK:
        _SHARED.clear()
        _LOADED.clear()


def _instance_token(model) -> str:
    token = getattr(model, "_multitap_reward_token", None)
    if token is None:
        token = uuid.uuid4().hex
        model._multitap_reward_token = token
    return token


def spec_for(model_or_path, *, base_model=None, heads=None, device=None, dtype=None, rope=None,
             max_batch_tokens: int = 8192, offload: bool = False, image_size="auto",
             max_length="auto", shard=None) -> tuple[ScorerSpec, object | None]:
    """(spec, already-loaded model or None). A ``MultiTapModel`` instance gets a spec that reloads
    it in other processes after pickling: its checkpoint, settings, backbone options, and its
    heads (a directory, or the heads themselves when they were attached as an object).

    ``shard="zero3"``: the reward model is partitioned over the ranks with DeepSpeed ZeRO-3 and
    gathered per call (:mod:`multitap_rl.sharding`); only for a model loaded from a path (an
    in-memory model would be emptied in place), not with ``offload``."""
    from multitap_rl.model import MultiTapModel
    from multitap_rl.sharding import check_shard

    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ConfigError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
    shard = check_shard(shard)
    if shard is not None and offload:
        raise ConfigError("shard='zero3' and offload=True both free accelerator memory between calls; pick one")
    if isinstance(model_or_path, MultiTapModel):
        if shard is not None:
            raise ConfigError("shard='zero3' loads and partitions the reward model itself: pass the checkpoint path, "
                              "not a loaded MultiTapModel (partitioning would empty that model in place)")
        given = {k: v for k, v in (("base_model", base_model), ("heads", heads), ("rope", rope)) if v is not None}
        if given:
            raise ConfigError(f"{sorted(given)} apply when loading from a path; the MultiTapModel passed is already "
                              "loaded (attach heads with model.load_heads)")
        info = model_or_path.info
        attached = getattr(model_or_path, "heads", None)
        heads_path = info.get("heads")
        options = model_or_path.backbone.options()
        spec = ScorerSpec(
            checkpoint=info.get("checkpoint"), base_model=info.get("base_model"), heads=heads_path,
            device=str(model_or_path.device),
            dtype="tf32" if getattr(model_or_path, "matmul_precision", None) == "tf32" else
            str(model_or_path.backbone.dtype).replace("torch.", ""),
            rope=model_or_path.backbone.rope, max_batch_tokens=max_batch_tokens, offload=offload,
            image_size=getattr(model_or_path.backbone, "image_size", None),
            max_length=getattr(model_or_path.backbone, "max_length", None),
            instance=_instance_token(model_or_path),
            backbone_options=tuple(sorted(options.items())) if options else None,
            heads_state=attached.to_bytes() if attached is not None and heads_path is None else None,
        )
        return spec, model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ConfigError(f"model_or_path must be a MultiTapModel, a directory or a hub id, got "
                          f"{type(model_or_path).__name__}")
    spec = ScorerSpec(
        checkpoint=os.fspath(model_or_path), base_model=None if base_model is None else os.fspath(base_model),
        heads=None if heads is None else os.fspath(heads), device=None if device is None else str(device),
        dtype=None if dtype is None else str(dtype).replace("torch.", ""), rope=rope,
        max_batch_tokens=max_batch_tokens, offload=offload, image_size=image_size, max_length=max_length,
        shard=shard,
    )
    return spec, None


def dimension_names(spec: ScorerSpec, model) -> tuple[tuple[str, ...], dict]:
    """Dimension names (and the heads' normalisation stats) without loading the backbone."""
    from multitap_rl.heads import RidgeHeads

    if model is not None:
        heads = getattr(model, "heads", None)
        return tuple(model.dimension_names), dict(getattr(heads, "stats", {}) or {})
    if spec.heads_state is not None:
        heads = RidgeHeads.from_bytes(spec.heads_state)
    elif spec.heads is not None:
        heads = RidgeHeads.load(spec.heads)
    else:
        return ("overall",), {}
    return ("overall", *heads.names), dict(heads.stats)


class RewardCore:
    """Spec + shared scorer + combiner + per-sample isolation; see the module docstring.

    Args:
        model_or_path: a loaded ``MultiTapModel``, or a MULTI-TAP checkpoint (directory or hub id)
            loaded lazily, once per process, on that process's device.
        weights, normalize, gates, momentum: the :class:`~multitap_rl.combiner.RewardCombiner`
            (``combine=False``: none, for per-dimension rewards).
        on_invalid: what a sample that cannot be scored (bad image, a text the prompt cannot hold,
            a non-finite score) gets: ``"raise"`` (a ``SampleError`` naming it), ``"none"`` or a
            float. Invalid samples are counted (:attr:`invalid_total`) and warned about once.
        Other arguments as :func:`spec_for`.
    """

    def __init__(self, model_or_path, *, base_model=None, heads=None, weights=None, normalize: str = "none",
                 gates: Sequence = (), momentum: float = 0.99, device=None, dtype=None, rope=None,
                 max_batch_tokens: int = 8192, offload: bool = False, image_size="auto", max_length="auto",
                 on_invalid="raise", combine: bool = True, invalid_options: Sequence[str] = ON_INVALID,
                 shard=None):
        from multitap_rl.combiner import RewardCombiner

        self.spec, model = spec_for(model_or_path, base_model=base_model, heads=heads, device=device, dtype=dtype,
                                    rope=rope, max_batch_tokens=max_batch_tokens, offload=offload,
                                    image_size=image_size, max_length=max_length, shard=shard)
        self.on_invalid = check_on_invalid(on_invalid, invalid_options)
        self.dimension_names, stats = dimension_names(self.spec, model)
        self.combiner = RewardCombiner(weights, self.dimension_names, normalize=normalize, stats=stats, gates=gates,
                                       momentum=momentum) if combine else None
        self._scorer = get_scorer(self.spec, model) if model is not None else None
        self.invalid_total = 0
        self._warned = False

    @property
    def scorer(self) -> SharedScorer:
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

    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None):
        """A :class:`~multitap_rl.model.ScoreOutput`; bad samples raise, or (``on_invalid`` not
        "raise") are reported in its ``errors`` (the adapter passes them to :meth:`note_invalid`)."""
        return self.scorer.score(images, texts, questions, on_error="raise" if self.on_invalid == "raise" else "skip")

    def note_invalid(self, errors: dict[int, SampleError], where: str = "sample") -> None:
        """Count the batch's invalid samples; warn about the first batch that has any, once."""
        if not errors:
            return
        self.invalid_total += len(errors)
        if not self._warned:
            self._warned = True
            first = next(iter(errors.values()))
            logger.warning("MULTI-TAP reward: %d %s(s) of a batch could not be scored and got %r (e.g. %s); "
                           "this warning is shown once, the count is logged", len(errors), where,
                           None if self.on_invalid == "none" else self.on_invalid, first)

    def invalid_value(self):
        return None if self.on_invalid == "none" else self.on_invalid

    def combine(self, dims: dict[str, torch.Tensor], valid: torch.Tensor | None = None):
        """``(CombinedReward over the valid samples, their indices)``. Runs even with no valid
        sample (running statistics are reduced across ranks on every call)."""
        if valid is None:
            idx = torch.arange(next(iter(dims.values())).shape[0])
        else:
            idx = valid.nonzero().reshape(-1)
        picked = {k: v[idx.to(v.device)] for k, v in dims.items()}
        return self.combiner(picked), idx


class CoreReward:
    """Base of the reward adapters: a :class:`RewardCore` and a stable ``__name__`` (TRL logs
    rewards by it), with the core's spec, combiner, weights, dimension names and model."""

    def __init__(self, core: RewardCore, name: str):
        self.core = core
        self.__name__ = name

    @property
    def spec(self) -> ScorerSpec:
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
    def scorer(self) -> SharedScorer:
        return self.core.scorer

    @property
    def model(self):
        return self.core.model
