"""One MULTI-TAP model per process, shared by every reward callable that names the same spec.

Reward callables carry only a small, picklable :class:`ScorerSpec`; the model is loaded lazily on
first use, in the process that calls it, on that process's device (accelerate's local process
device unless one is given), bf16 on GPU. All callables with an equal spec share one
:class:`SharedScorer`, so ``multitap_objective_rewards`` costs one model and one forward per batch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ScorerSpec", "SharedScorer", "get_scorer", "spec_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerSpec:
    """Everything needed to (re)load the scorer in any process. Hashable."""

    checkpoint: str
    base_model: str | None = None
    heads: str | None = None
    device: str | None = None
    dtype: str | None = None
    rope: str | None = None
    max_batch_tokens: int = 8192
    offload: bool = False  # keep the model on CPU between calls (frees GPU memory for the policy)
    image_size: int | None = 560
    max_length: int | None | str = "auto"  # "auto": the backbone's reference value (see MultiTapModel.from_pretrained)
    # id() of an in-memory model this spec was made from: two model objects never share a scorer.
    # In another process (after pickling) no model has that id, and the spec loads from `checkpoint`
    # with that model's backbone options and, if its heads were given as an object, those heads.
    instance: int | None = None
    backbone_options: tuple[tuple[str, Any], ...] | None = None
    heads_state: tuple[str, bytes] | None = None  # RidgeHeads.to_bytes() of in-memory heads


class SharedScorer:
    """Lazily loaded model + a one-batch cache so several reward callables share one forward."""

    def __init__(self, spec: ScorerSpec, model=None):
        self.spec = spec
        self._model = model
        self._home = None if model is None else model.device  # where the model computes
        self._lock = threading.Lock()
        self._cache_key: tuple | None = None
        self._cache_refs: tuple | None = None
        self._cache_value: dict[str, torch.Tensor] | None = None

    # -- model ---------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            from multitap_rl import EngineConfig, MultiTapModel

            s = self.spec
            if s.checkpoint is None:
                raise RuntimeError(
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
    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None,
              cache_on: tuple = (), tag: str = "") -> dict[str, torch.Tensor]:
        """``{"overall": (N,), <dim>: (N,), ...}`` float32 CPU. ``cache_on``: objects whose identity
        marks one batch (TRL passes the same ``prompts``/``completions`` lists to every reward
        function of a step); a repeated call with the same objects and ``tag`` (what the caller
        derived from them, e.g. the task) returns the cached result."""
        key = (tag, *(id(o) for o in cache_on))
        with self._lock:
            if cache_on and key == self._cache_key:
                return self._cache_value
            model = self._onload()
            try:
                out = model.score(images, texts, questions)
            finally:
                self._offload()
            dims = {"overall": out.overall, **out.dims}
            if cache_on:
                # hold references so the ids cannot be reused by other objects while cached
                self._cache_key, self._cache_refs, self._cache_value = key, cache_on, dims
            return dims


_SCORERS: dict[ScorerSpec, SharedScorer] = {}
_LOCK = threading.Lock()


def get_scorer(spec: ScorerSpec, model=None) -> SharedScorer:
    with _LOCK:
        scorer = _SCORERS.get(spec)
        if scorer is None:
            scorer = _SCORERS[spec] = SharedScorer(spec, model)
        elif model is not None and scorer._model is None:
            scorer._model, scorer._home = model, model.device
        return scorer


def spec_for(model_or_path, *, base_model=None, heads=None, device=None, dtype=None, rope=None,
             max_batch_tokens: int = 8192, offload: bool = False) -> tuple[ScorerSpec, object | None]:
    """(spec, already-loaded model or None). A ``MultiTapModel`` instance gets a spec that reloads
    it in other processes after pickling: its checkpoint, settings, backbone options, and its
    heads (a directory, or the heads themselves when they were attached as an object)."""
    from multitap_rl.model import MultiTapModel

    if max_batch_tokens < 1:
        raise ValueError("max_batch_tokens must be >= 1")
    if isinstance(model_or_path, MultiTapModel):
        info = model_or_path.info
        heads = getattr(model_or_path, "heads", None)
        heads_path = info.get("heads")
        options = model_or_path.backbone.options()
        spec = ScorerSpec(
            checkpoint=info.get("checkpoint"), base_model=info.get("base_model"), heads=heads_path,
            device=str(model_or_path.device), dtype=str(model_or_path.backbone.dtype).replace("torch.", ""),
            rope=model_or_path.backbone.rope, max_batch_tokens=max_batch_tokens, offload=offload,
            image_size=getattr(model_or_path.backbone, "image_size", None),
            max_length=getattr(model_or_path.backbone, "max_length", None),
            instance=id(model_or_path),
            backbone_options=tuple(sorted(options.items())) if options else None,
            heads_state=heads.to_bytes() if heads is not None and heads_path is None else None,
        )
        return spec, model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"model_or_path must be a MultiTapModel, a directory or a hub id, got "
                        f"{type(model_or_path).__name__}")
    spec = ScorerSpec(
        checkpoint=os.fspath(model_or_path), base_model=None if base_model is None else os.fspath(base_model),
        heads=None if heads is None else os.fspath(heads), device=None if device is None else str(device),
        dtype=None if dtype is None else str(dtype).replace("torch.", ""), rope=rope,
        max_batch_tokens=max_batch_tokens, offload=offload,
    )
    return spec, None
