"""MULTI-TAP reward functions for TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

TRL calls each reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns,
trainer_state=..., log_extra=..., log_metric=...)`` and expects one float (or ``None``) per
completion. The images of a vision dataset reach us as the ``image`` column (one image per
completion) or ``images`` (a list per completion).

* :func:`multitap_reward` -- one callable: the user-weighted combination of ``overall`` and the
  stage-2 dimensions (normalisation and gates as in :class:`multitap_rl.objectives.RewardCombiner`);
  logs every dimension's batch mean through ``log_metric``.
* :func:`multitap_objective_rewards` -- one callable per dimension, named ``multitap_<dim>``, all
  sharing one model and one forward per batch, so TRL's ``reward_weights``,
  ``multi_objective_aggregation`` and per-reward logging apply.

Both are plain picklable callables (not ``nn.Module``: TRL would treat a module as a text
classifier and never pass it the images).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ._shared import ScorerSpec, get_scorer, spec_for

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
    """One image (or None) per completion from TRL's ``image`` / ``images`` columns."""
    if kwargs.get("image") is not None:
        images = list(kwargs["image"])
    elif kwargs.get("images") is not None:
        images = []
        for i, item in enumerate(kwargs["images"]):
            if item is None or (isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 0):
                images.append(None)
            elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
                if len(item) > 1:
                    raise ValueError(f"sample {i}: {len(item)} images; MULTI-TAP scores one image per sample")
                images.append(item[0])
            else:
                images.append(item)
    else:
        raise ValueError(
            "no images reached the MULTI-TAP reward: the dataset needs an 'image' column (one per sample) or "
            "an 'images' column (a list per sample)"
        )
    if len(images) != n:
        raise ValueError(f"got {len(images)} images for {n} completions")
    return images


class _Base:
    """Shared plumbing: spec -> scorer, TRL input parsing, None handling."""

    def __init__(self, spec: ScorerSpec, model, task: str, empty_reward: float | None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if empty_reward is not None and not math.isfinite(empty_reward):
            raise ValueError("empty_reward must be finite or None")
        self.spec, self.task, self.empty_reward = spec, task, empty_reward
        if model is not None:
            get_scorer(spec, model)

    @property
    def scorer(self):
        return get_scorer(self.spec)

    def _dims(self, prompts, completions, kwargs) -> tuple[list[int], dict[str, torch.Tensor] | None, list[int]]:
        """(indices scored, dims over those, indices with empty text)."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions")
        images = _images_from_kwargs(kwargs, n)
        texts = [completion_text(c) for c in completions]
        keep = [i for i in range(n) if images[i] is not None and texts[i].strip()]
        empty = [i for i in range(n) if images[i] is not None and not texts[i].strip()]
        if not keep:
            return keep, None, empty
        questions = [prompt_question(prompts[i]) for i in keep] if self.task == "instruction" else None
        dims = self.scorer.score([images[i] for i in keep], [texts[i] for i in keep], questions,
                                 cache_on=(prompts, completions), tag=self.task)
        return keep, dims, empty

    def _fill(self, n: int, keep: list[int], values: torch.Tensor | None, empty: list[int]) -> list[float | None]:
        out: list[float | None] = [None] * n
        if values is not None:
            for i, v in zip(keep, values.tolist()):
                out[i] = float(v)
        for i in empty:
            out[i] = self.empty_reward
        return out


def _dimension_names(spec: ScorerSpec, model) -> tuple[tuple[str, ...], dict]:
    """Dimension names (and heads' normalisation stats) without loading the backbone."""
    if model is not None:
        heads = getattr(model, "heads", None)
        return tuple(model.dimension_names), dict(getattr(heads, "stats", {}) or {})
    if spec.heads is None:
        return ("overall",), {}
    from multitap_rl.heads import RidgeHeads

    heads = RidgeHeads.load(spec.heads)
    return ("overall", *heads.names), dict(heads.stats)


class MultiTapReward(_Base):
    """The weighted MULTI-TAP reward as a TRL reward function (see :func:`multitap_reward`)."""

    def __init__(self, spec: ScorerSpec, model=None, *, weights=None, normalize: str = "none", gates=(),
                 task: str = "caption", name: str = "multitap", empty_reward: float | None = None,
                 log_dims: bool = True, momentum: float = 0.99):
        from multitap_rl.objectives import RewardCombiner

        super().__init__(spec, model, task, empty_reward)
        names, stats = _dimension_names(spec, model)
        self.combiner = RewardCombiner(weights, names, normalize=normalize, stats=stats, gates=gates,
                                       momentum=momentum)
        self.__name__ = name
        self.log_dims = log_dims

    @property
    def weights(self):
        return self.combiner.weights

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        n = len(completions)
        keep, dims, empty = self._dims(prompts, completions, kwargs)
        if dims is None:
            return self._fill(n, keep, None, empty)
        combined = self.combiner(dims)
        if self.log_dims:
            log_metric = kwargs.get("log_metric")
            if callable(log_metric):
                for name, values in combined.dims.items():
                    log_metric(f"{self.__name__}/{name}", float(values.mean()))
                if combined.gated is not None:
                    log_metric(f"{self.__name__}/gated_frac", float(combined.gated.float().mean()))
            log_extra = kwargs.get("log_extra")
            if callable(log_extra):
                for name, values in combined.dims.items():
                    log_extra(f"{self.__name__}_{name}", self._fill(n, keep, values, []))
        return self._fill(n, keep, combined.reward, empty)


class MultiTapObjectiveReward(_Base):
    """One MULTI-TAP dimension as a TRL reward function, named ``multitap_<dim>``."""

    def __init__(self, spec: ScorerSpec, dim: str, model=None, *, task: str = "caption",
                 empty_reward: float | None = None, prefix: str = "multitap_"):
        super().__init__(spec, model, task, empty_reward)
        self.dim = dim
        self.__name__ = f"{prefix}{dim}"

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        keep, dims, empty = self._dims(prompts, completions, kwargs)
        if dims is not None and self.dim not in dims:
            raise ValueError(f"dimension {self.dim!r} not produced by the model; it has {sorted(dims)}")
        return self._fill(len(completions), keep, None if dims is None else dims[self.dim], empty)


def multitap_reward(model_or_path, base_model=None, heads=None, weights=None, *, normalize: str = "none",
                    gates: Sequence = (), task: str = "caption", device=None, dtype=None, rope=None,
                    max_batch_tokens: int = 8192, offload: bool = False, name: str = "multitap",
                    empty_reward: float | None = None, log_dims: bool = True) -> MultiTapReward:
    """A TRL reward function: ``(prompts, completions, **kwargs) -> list[float | None]``.

    Args:
        model_or_path: a loaded ``MultiTapModel``, or a MULTI-TAP checkpoint (directory or hub id)
            loaded lazily, once per process, on that process's device.
        base_model, heads: as for ``MultiTapModel.from_pretrained``.
        weights: over ``overall`` and the heads' dimensions (dict, ``"safety=2,clarity=1"``, YAML
            path or preset name); default ``overall=1``. Unknown names raise ``ValueError`` listing
            the valid ones -- here, not at the first training step.
        normalize: "none" | "fixed" (z-score with the heads' stored statistics) | "running" (EMA).
        gates: e.g. ``["safety<0.5:cap=0"]``.
        task: "caption" (completion = caption) or "instruction" (question = the prompt's last user
            text, completion = response).
        offload: move the model to CPU between calls (frees accelerator memory for the policy).
        empty_reward: reward for a completion with no text (default ``None``: TRL treats it as
            missing). Samples without an image always get ``None``.
    """
    spec, model = spec_for(model_or_path, base_model=base_model, heads=heads, device=device, dtype=dtype,
                           rope=rope, max_batch_tokens=max_batch_tokens, offload=offload)
    return MultiTapReward(spec, model, weights=weights, normalize=normalize, gates=gates, task=task, name=name,
                          empty_reward=empty_reward, log_dims=log_dims)


def multitap_objective_rewards(model_or_path, base_model=None, heads=None, dims: Sequence[str] | None = None, *,
                               task: str = "caption", device=None, dtype=None, rope=None,
                               max_batch_tokens: int = 8192, offload: bool = False,
                               empty_reward: float | None = None) -> list[MultiTapObjectiveReward]:
    """One TRL reward function per dimension (``overall`` and each head dimension, or ``dims``),
    named ``multitap_<dim>``, sharing one model and one forward per batch. Pass them with
    ``GRPOConfig(reward_weights=[...], multi_objective_aggregation=...)``."""
    spec, model = spec_for(model_or_path, base_model=base_model, heads=heads, device=device, dtype=dtype,
                           rope=rope, max_batch_tokens=max_batch_tokens, offload=offload)
    names, _ = _dimension_names(spec, model)
    chosen = list(names if dims is None else dims)
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise ValueError(f"unknown dimension(s) {unknown}; valid names: {list(names)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"dimensions repeat in {chosen}: TRL logs rewards by name")
    return [MultiTapObjectiveReward(spec, d, model, task=task, empty_reward=empty_reward) for d in chosen]
