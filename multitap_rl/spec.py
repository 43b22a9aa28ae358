"""``ModelSpec``: which MULTI-TAP model, loaded how -- the one thing any process needs to load it.

Every reward adapter, a TRL worker, a verl reward worker or a served replica receives a spec
(never the model): small, frozen, hashable and picklable. ``MultiTapModel.from_spec(spec)``
builds the model; a model remembers the spec it was loaded from (``model.spec``).

Fields that say *which* model: ``checkpoint``, ``base_model``, ``heads``. Fields that say *how*:
``device``, ``dtype``, ``rope``, ``image_size``, ``max_length``, ``engine`` (batching limits, an
:class:`~multitap_rl.scoring.EngineConfig`), ``offload``, ``shard``, ``backbone_options``.
``"auto"`` for ``image_size``/``max_length`` takes the checkpoint's recorded value (else the
reference's); the loaded backbone's resolved values are in ``model.backbone.settings``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError
from .scoring import EngineConfig

__all__ = ["AUTO", "ModelSpec", "is_server_url", "server_urls"]

AUTO = "auto"


def is_server_url(value) -> bool:
    """True for a served reward's address: ``http(s)://...`` (several: comma-separated)."""
    return isinstance(value, str) and value.strip().startswith(("http://", "https://"))


def server_urls(value: str) -> list[str]:
    """The URLs of a ``"http://a:8000,http://b:8000"`` checkpoint, each checked to be http(s)."""
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if not urls or bad:
        raise ConfigError(f"a served reward's address must be http(s)://host:port (comma-separated for several), "
                          f"got {value!r}")
    return urls


def _path(value, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(f"ModelSpec.{name} must be a path or hub id (str), got {value!r}")
    return os.fspath(value)


_SIZE_RULES = {"image_size": (1, "a positive int or None (no resize)"), "max_length": (2, "an int >= 2 or None")}


def _size(value, name: str):
    if value is None or value == AUTO:
        return value
    least, rule = _SIZE_RULES[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be {rule}, got {value!r} (or 'auto': the checkpoint's own setting)")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """Which MULTI-TAP model, loaded how (see the module docstring). Keyword fields only.

    Args:
        checkpoint: a MULTI-TAP checkpoint (local directory or hub id); None only for a spec taken
            from an in-memory model that was never saved (it cannot be loaded elsewhere).
        base_model: the base LVLM (directory or hub id); default: the one the checkpoint names.
        heads: a stage-2 heads directory.
        device: a torch device; None: this process's accelerator (accelerate's local process
            device), else CPU -- so one spec serves every rank.
        dtype: "bf16" | "fp16" | "fp32" | "tf32" | None (bf16 on GPU, fp32 on CPU).
        rope: "reference" (as the released checkpoints were scored) | "mrope" | None (the
            checkpoint's own setting).
        image_size, max_length: int, None (never resize / truncate) or "auto" (the checkpoint's).
        engine: batching limits (:class:`~multitap_rl.scoring.EngineConfig`).
        offload: keep the model on CPU between reward calls (frees accelerator memory).
        shard: "zero3": partition the model over the ranks between calls (DeepSpeed ZeRO-3).
        backbone_options: the backbone adapter's own options, as ``{name: value}`` or sorted pairs;
            None: those the checkpoint recorded.
        fingerprint: the checkpoint fingerprint the model must have (``model.info["fingerprint"]``,
            or the server's): loading anything else is a ``CheckpointError``. None: not checked.

    ``checkpoint`` may be a served reward's URL (``multitap-rl serve``; several comma-separated):
    the model is then the server's, and only ``fingerprint`` of the loading fields applies.
    """

    checkpoint: str | None = None
    base_model: str | None = None
    heads: str | None = None
    device: str | None = None
    dtype: str | None = None
    rope: str | None = None
    image_size: int | None | str = AUTO
    max_length: int | None | str = AUTO
    engine: EngineConfig = field(default_factory=EngineConfig)
    offload: bool = False
    shard: str | None = None
    backbone_options: tuple[tuple[str, Any], ...] | None = None
    fingerprint: str | None = None
    # Set when a reward is made from an in-memory model: a token unique to that model object (two
    # models never share a scorer) and its heads when they were attached as an object.
    instance: str | None = field(default=None, repr=False)
    heads_state: bytes | None = field(default=None, repr=False)

    def __post_init__(self):
        from .sharding import check_shard

        set_ = object.__setattr__
        for name in ("checkpoint", "base_model", "heads"):
            set_(self, name, _path(getattr(self, name), name))
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise ConfigError(f"ModelSpec.fingerprint must be a str, got {self.fingerprint!r}")
        if self.device is not None:
            set_(self, "device", str(self.device))
        if self.dtype is not None:
            set_(self, "dtype", str(self.dtype).replace("torch.", ""))
        for name in ("image_size", "max_length"):
            _size(getattr(self, name), name)
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError(f"ModelSpec.engine must be an EngineConfig, got {type(self.engine).__name__}")
        if not isinstance(self.offload, bool):
            raise ConfigError(f"ModelSpec.offload must be True or False, got {self.offload!r}")
        check_shard(self.shard)
        if self.shard is not None and self.offload:
            raise ConfigError("shard='zero3' and offload=True both free accelerator memory between calls; pick one")
        if is_server_url(self.checkpoint):
            server_urls(self.checkpoint)
            local = [n for n in ("base_model", "heads", "shard") if getattr(self, n) is not None] + \
                (["offload"] if self.offload else [])
            if local:
                raise ConfigError(f"{local} load a model here; the served reward at {self.checkpoint} has its own "
                                  "(start the server with them)")
        options = self.backbone_options
        if isinstance(options, dict):
            if not all(isinstance(k, str) for k in options):
                raise ConfigError(f"ModelSpec.backbone_options must have str keys, got {options!r}")
            set_(self, "backbone_options", tuple(sorted(options.items())))
        elif options is not None and not isinstance(options, tuple):
            raise TypeError(f"backbone_options must be a dict of keyword arguments, got {type(options).__name__}")

    @classmethod
    def from_kwargs(cls, model_or_path, **kwargs) -> ModelSpec:
        """A spec from flat keywords, as trainers configure rewards from YAML: ``model_or_path``
        is the checkpoint; ``max_batch_tokens``, ``max_batch_patches`` and
        ``max_images_per_chunk`` go into the engine; every other keyword is a field."""
        engine_keys = {f.name for f in fields(EngineConfig)}
        engine = {k: kwargs.pop(k) for k in list(kwargs) if k in engine_keys}
        known = {f.name for f in fields(cls)} - {"checkpoint", "engine", "instance", "heads_state"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown model setting(s) {unknown}; valid: {sorted(known | engine_keys)}")
        return cls(checkpoint=model_or_path, engine=EngineConfig(**engine), **kwargs)

    @property
    def is_remote(self) -> bool:
        """True when the model is a served reward's (``checkpoint`` is a URL)."""
        return is_server_url(self.checkpoint)

    def replace(self, **changes) -> ModelSpec:
        """A copy with ``changes`` applied (validated like a new spec)."""
        return replace(self, **changes)
