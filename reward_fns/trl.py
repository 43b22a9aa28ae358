"""MULTI-TAP reward functions for TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

TRL calls each reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns,
trainer_state=..., log_extra=..., log_metric=...)`` and expects one float (or ``None``) per
completion. The images of a vision dataset reach us as the ``image`` column (one image per
completion) or ``images`` (a list per completion).

* :func:`multitap_reward` -- one callable: the user-weighted combination of ``overall`` and the
  stage-2 dimensions (normalisation and gates as in :class:`multitap_rl.combiner.RewardCombiner`);
  logs every dimension's batch mean through ``log_metric``.
* :func:`multitap_objective_rewards` -- one callable per dimension, named ``multitap_<dim>``, all
  sharing one model and one forward per batch, so TRL's ``reward_weights``,
  ``multi_objective_aggregation`` and per-reward logging apply.

Both are plain picklable callables (not ``nn.Module``: TRL would treat a module as a text
classifier and never pass it the images). A completion that cannot be scored (no image, an
undecodable image, a text the prompt cannot hold) gets ``on_invalid`` (default ``None``, which TRL
ignores) instead of failing the batch; the count is logged as ``<name>/invalid``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from multitap_rl.errors import ConfigError, DataError, SampleError

from .core import CoreReward, RewardCore

__all__ = [
    "MultiTapObjectiveReward",
    "MultiTapReward",
    "completion_text",
    "multitap_objective_rewards",
    "multitap_reward",
    "prompt_question",
]

logger = logging.getLogger(__name__)

TASKS = ("caption", "instruction")


# -- reading TRL's inputs ------------------------------------------------------------------------
def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, dict) and part.get("type", "text") == "text")
    raise TypeError(f"unsupported message content of type {type(content).__name__}")


def completion_text(completion) -> str:
    """A completion as TRL passes it: a string, or a list of messages (the assistant's text)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _text_of(completion.get("content"))
    if isinstance(completion, Sequence):
        msgs = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in msgs if m.get("role", "assistant") == "assistant"] or msgs
        return "".join(_text_of(m.get("content")) for m in assistant)
    raise TypeError(f"unsupported completion of type {type(completion).__name__}")


def prompt_question(prompt) -> str:
    """The question of an instruction-task prompt: the last user message's text (or the string)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return _text_of(users[-1].get("content")).strip()
    raise TypeError(f"cannot read a question from a prompt of type {type(prompt).__name__}")


def _images_from_kwargs(kwargs: dict, n: int) -> list:
    """One image (or None) per completion from TRL's ``image`` / ``images`` columns. A completion
    with several images is kept as a list (the scorer reports it as invalid)."""
    if kwargs.get("image") is not None:
        images = list(kwargs["image"])
    elif kwargs.get("images") is not None:
        images = []
        for item in kwargs["images"]:
            if item is None or (isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 0):
                images.append(None)
            elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
                images.append(item[0] if len(item) == 1 else _Several(len(item)))
            else:
                images.append(item)
    else:
        raise DataError(
            "no images reached the MULTI-TAP reward: the dataset needs an 'image' column (one per sample) or "
            "an 'images' column (a list per sample)"
        )
    if len(images) != n:
        raise DataError(f"got {len(images)} images for {n} completions")
    return images


class _Several:
    """Stands for a completion's several images (MULTI-TAP scores one image per sample)."""

    def __init__(self, n: int):
        self.n = n


class _TRLReward(CoreReward):
    """Shared plumbing of the TRL callables: a :class:`RewardCore`, TRL input parsing, per-sample
    isolation (``on_invalid``) and empty completions (``empty_reward``)."""

    def __init__(self, core: RewardCore, task: str, empty_reward: float | None, name: str):
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        if empty_reward is not None and (isinstance(empty_reward, bool) or not isinstance(empty_reward, (int, float))
                                         or not math.isfinite(empty_reward)):
            raise ConfigError(f"empty_reward must be a finite number or None, got {empty_reward!r}")
        super().__init__(core, name)
        self.task, self.empty_reward = task, empty_reward

    def _score(self, prompts, completions, kwargs):
        """(ScoreOutput over the scored completions or None, their indices, indices with empty text,
        invalid completion -> SampleError named by completion index)."""
        n = len(completions)
        if len(prompts) != n:
            raise DataError(f"got {len(prompts)} prompts for {n} completions")
        images = _images_from_kwargs(kwargs, n)
        invalid: dict[int, SampleError] = {}
        texts: list[str | None] = []
        for i, c in enumerate(completions):
            try:
                texts.append(completion_text(c))
            except TypeError as exc:
                invalid[i] = SampleError(i, "text", str(exc), unit="completion")
                texts.append(None)
        for i, img in enumerate(images):
            if i in invalid:
                continue
            if img is None:
                invalid[i] = SampleError(i, "image", "missing (no image reached the reward)", unit="completion")
            elif isinstance(img, _Several):
                invalid[i] = SampleError(i, "image", f"{img.n} images; MULTI-TAP scores one image per sample",
                                         unit="completion")
        questions = None
        if self.task == "instruction":
            questions = []
            for i, p in enumerate(prompts):
                try:
                    questions.append(prompt_question(p))
                except TypeError as exc:
                    questions.append(None)
                    invalid.setdefault(i, SampleError(i, "question", str(exc), unit="completion"))
        empty = [i for i in range(n) if i not in invalid and not texts[i].strip()]
        keep = [i for i in range(n) if i not in invalid and i not in empty]
        if invalid and self.core.on_invalid == "raise":
            raise invalid[min(invalid)]
        out = None
        if keep or self.core.spec.shard is not None:  # a sharded model's gather is collective: always take part
            qs = None if questions is None else [questions[i] for i in keep]
            try:
                out = self.core.score([images[i] for i in keep], [texts[i] for i in keep], qs)
            except SampleError as exc:  # on_invalid="raise": name the completion, not the batch index
                raise exc.at(keep[exc.index], unit="completion") from exc
            for j, exc in out.errors.items():
                invalid[keep[j]] = exc.at(keep[j], unit="completion")
        return out, keep, empty, invalid

    def _fill(self, n: int, keep: list[int], values, empty: list[int], invalid) -> list[float | None]:
        out: list[float | None] = [None] * n
        if values is not None:
            for i, v in zip(keep, values):
                out[i] = v
        for i in empty:
            out[i] = self.empty_reward
        bad = self.core.invalid_value()
        for i in invalid:
            out[i] = bad
        return out


class MultiTapReward(_TRLReward):
    """The weighted MULTI-TAP reward as a TRL reward function (see :func:`multitap_reward`)."""

    def __init__(self, core: RewardCore, *, task: str = "caption", name: str = "multitap",
                 empty_reward: float | None = None, log_dims: bool = True):
        super().__init__(core, task, empty_reward, name)
        self.log_dims = log_dims

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        n = len(completions)
        out, keep, empty, invalid = self._score(prompts, completions, kwargs)
        self.core.note_invalid({i: e for i, e in invalid.items()}, "completion")
        # combine on every call, also with nothing valid: running statistics are shared across ranks
        dims = {k: torch.zeros(0) for k in self.core.dimension_names} if out is None else \
            {"overall": out.overall, **out.dims}
        valid = None if out is None else out.valid
        combined, idx = self.core.combine(dims, valid)
        scored = [keep[int(j)] for j in idx]
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/invalid", float(len(invalid)))
        if self.log_dims:
            if callable(log_metric) and len(scored):
                for name, values in combined.dims.items():
                    log_metric(f"{self.__name__}/{name}", float(values.mean()))
                if combined.gated is not None:
                    log_metric(f"{self.__name__}/gated_frac", float(combined.gated.float().mean()))
            log_extra = kwargs.get("log_extra")
            if callable(log_extra):
                for name, values in combined.dims.items():
                    log_extra(f"{self.__name__}_{name}", self._fill(n, scored, values.tolist(), [], {}))
        return self._fill(n, scored, combined.reward.tolist(), empty, invalid)


class MultiTapObjectiveReward(_TRLReward):
    """One MULTI-TAP dimension as a TRL reward function, named ``multitap_<dim>``."""

    def __init__(self, core: RewardCore, dim: str, *, task: str = "caption", empty_reward: float | None = None,
                 prefix: str = "multitap_"):
        if dim not in core.dimension_names:
            raise ConfigError(f"unknown dimension {dim!r}; valid names: {list(core.dimension_names)}")
        super().__init__(core, task, empty_reward, f"{prefix}{dim}")
        self.dim = dim

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        out, keep, empty, invalid = self._score(prompts, completions, kwargs)
        self.core.note_invalid(invalid, "completion")
        values = None
        if out is not None:
            col = out.overall if self.dim == "overall" else out.dims[self.dim]
            values = [None if j in out.errors else float(col[j]) for j in range(len(keep))]
        return self._fill(len(completions), keep, values, empty, invalid)


def multitap_reward(model_or_path, base_model=None, heads=None, weights=None, *, normalize: str = "none",
                    gates: Sequence = (), momentum: float = 0.99, task: str = "caption", device=None, dtype=None,
                    rope=None, max_batch_tokens: int = 8192, offload: bool = False, name: str = "multitap",
                    empty_reward: float | None = None, on_invalid="none", log_dims: bool = True,
                    image_size="auto", max_length="auto", shard=None) -> MultiTapReward:
    """A TRL reward function: ``(prompts, completions, **kwargs) -> list[float | None]``.

    Args:
        model_or_path: a loaded ``MultiTapModel``, or a MULTI-TAP checkpoint (directory or hub id)
            loaded lazily, once per process, on that process's device.
        base_model, heads: as for ``MultiTapModel.from_pretrained``.
        weights: over ``overall`` and the heads' dimensions (dict, ``"safety=2,clarity=1"``, YAML
            path or preset name); default ``overall=1``. Unknown names raise ``ConfigError`` listing
            the valid ones -- here, not at the first training step.
        normalize: "none" | "fixed" (z-score with the heads' stored statistics) | "running" (EMA,
            with ``momentum``; shared across ranks under torch.distributed).
        gates: e.g. ``["safety<0.5:cap=0"]``.
        task: "caption" (completion = caption) or "instruction" (question = the prompt's last user
            text, completion = response).
        offload: move the model to CPU between calls (frees accelerator memory for the policy).
        empty_reward: reward for a completion with no text (default ``None``: TRL treats it as
            missing).
        on_invalid: reward of a completion that cannot be scored (no or bad image, a text the
            prompt cannot hold): ``"none"`` (default; TRL ignores it), a float, or ``"raise"``.
        shard: ``"zero3"`` partitions the reward model over the ranks with DeepSpeed ZeRO-3 (each
            rank holds 1/world of its weights between calls; gathered for each call). Needs a
            distributed launch and a checkpoint path. See :mod:`multitap_rl.sharding`.
    """
    core = RewardCore(model_or_path, base_model=base_model, heads=heads, weights=weights, normalize=normalize,
                      gates=gates, momentum=momentum, device=device, dtype=dtype, rope=rope,
                      max_batch_tokens=max_batch_tokens, offload=offload, image_size=image_size,
                      max_length=max_length, on_invalid=on_invalid, shard=shard)
    return MultiTapReward(core, task=task, name=name, empty_reward=empty_reward, log_dims=log_dims)


def multitap_objective_rewards(model_or_path, base_model=None, heads=None, dims: Sequence[str] | None = None, *,
                               task: str = "caption", device=None, dtype=None, rope=None,
                               max_batch_tokens: int = 8192, offload: bool = False,
                               empty_reward: float | None = None, on_invalid="none", image_size="auto",
                               max_length="auto", shard=None) -> list[MultiTapObjectiveReward]:
    """One TRL reward function per dimension (``overall`` and each head dimension, or ``dims``),
    named ``multitap_<dim>``, sharing one model and one forward per batch. Pass them with
    ``GRPOConfig(reward_weights=[...], multi_objective_aggregation=...)``."""
    core = RewardCore(model_or_path, base_model=base_model, heads=heads, device=device, dtype=dtype, rope=rope,
                      max_batch_tokens=max_batch_tokens, offload=offload, image_size=image_size,
                      max_length=max_length, on_invalid=on_invalid, combine=False, shard=shard)
    names = core.dimension_names
    if isinstance(dims, str):
        raise ConfigError(f"dims must be a list of dimension names, got the string {dims!r}")
    chosen = list(names if dims is None else dims)
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise ConfigError(f"unknown dimension(s) {unknown}; valid names: {list(names)}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"dimensions repeat in {chosen}: TRL logs rewards by name")
    return [MultiTapObjectiveReward(core, d, task=task, empty_reward=empty_reward) for d in chosen]
