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
undecodable image, a text that is not valid Unicode) gets ``on_invalid`` (default ``"skip"``:
``None``, which TRL ignores) instead of failing the batch; the count is logged as
``<name>/invalid``. Every text the reference scores is scored here too, empty completions included
(``empty_reward="score"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from multitap_rl.errors import ConfigError, DataError, SampleError

from .core import CoreReward, RewardBatch, RewardCore, StepCache

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
    """Shared plumbing of the TRL callables: a :class:`RewardCore`, TRL input parsing, and empty
    completions (``empty_reward``)."""

    def __init__(self, core: RewardCore, task: str, empty_reward: float | str | None, name: str,
                 cache: StepCache | None = None, member: int = 0):
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        if empty_reward is not None and empty_reward != "score" and (
                isinstance(empty_reward, bool) or not isinstance(empty_reward, (int, float))
                or not math.isfinite(empty_reward)):
            raise ConfigError(f"empty_reward must be 'score', a finite number or None, got {empty_reward!r}")
        super().__init__(core, name)
        self.task, self.empty_reward = task, empty_reward
        self._cache, self._member = cache, member

    def _evaluate(self, prompts, completions, kwargs) -> tuple[RewardBatch, list[int]]:
        """(the core's RewardBatch over every completion, indices of completions with empty text that
        are not scored but get ``empty_reward`` -- none under the default "score")."""
        if self._cache is None:
            return self._evaluate_now(prompts, completions, kwargs)
        inputs = (prompts, completions, kwargs.get("image"), kwargs.get("images"))
        return self._cache.get(self._member, inputs, lambda: self._evaluate_now(prompts, completions, kwargs))

    def _evaluate_now(self, prompts, completions, kwargs) -> tuple[RewardBatch, list[int]]:
        # 1. TRL's inputs -> images, texts, questions; what cannot be read is that completion's problem.
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
                invalid[i] = SampleError(i, "text", str(exc))
                texts.append(None)
        for i, img in enumerate(images):
            if i in invalid:
                continue
            if img is None:
                invalid[i] = SampleError(i, "image", "missing (no image reached the reward)")
            elif isinstance(img, _Several):
                invalid[i] = SampleError(i, "image", f"{img.n} images; MULTI-TAP scores one image per sample")
        questions = None
        if self.task == "instruction":
            questions = []
            for i, p in enumerate(prompts):
                try:
                    questions.append(prompt_question(p))
                except TypeError as exc:
                    questions.append(None)
                    invalid.setdefault(i, SampleError(i, "question", str(exc)))
        # 2. One core call; empty completions are scored as the reference scores them, unless the
        #    user asked for a value of their own (empty_reward).
        empty = [] if self.empty_reward == "score" else \
            [i for i in range(n) if i not in invalid and not texts[i].strip()]
        batch = self.core.evaluate(images, texts, questions, unit="completion", invalid=invalid, aside=empty)
        return batch, empty

    def _values(self, batch: RewardBatch, empty: list[int], name: str | None = None) -> list[float | None]:
        out = batch.values(name)
        for i in empty:
            out[i] = self.empty_reward
        return out


class MultiTapReward(_TRLReward):
    """The weighted MULTI-TAP reward as a TRL reward function (see :func:`multitap_reward`)."""

    def __init__(self, core: RewardCore, *, task: str = "caption", name: str = "multitap",
                 empty_reward: float | str | None = "score", log_dims: bool = True):
        super().__init__(core, task, empty_reward, name)
        self.log_dims = log_dims

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        batch, empty = self._evaluate(prompts, completions, kwargs)
        scored = batch.valid
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/invalid", float(len(batch.errors)))
        if self.log_dims:
            if callable(log_metric) and bool(scored.any()):
                for name, values in batch.scores.items():
                    log_metric(f"{self.__name__}/{name}", float(values[scored].mean()))
                if batch.gated is not None:
                    log_metric(f"{self.__name__}/gated_frac", float(batch.gated[scored].float().mean()))
            log_extra = kwargs.get("log_extra")
            if callable(log_extra):
                for name, values in batch.scores.items():
                    log_extra(f"{self.__name__}_{name}", [v if ok else None for v, ok in
                                                         zip(values.tolist(), scored.tolist())])
        return self._values(batch, empty)


class MultiTapObjectiveReward(_TRLReward):
    """One MULTI-TAP dimension as a TRL reward function, named ``multitap_<dim>``; the callables
    made together share one forward per batch (:class:`~reward_fns.core.StepCache`)."""

    def __init__(self, core: RewardCore, dim: str, *, task: str = "caption", empty_reward: float | str | None = "score",
                 prefix: str = "multitap_", cache: StepCache | None = None, member: int = 0):
        if dim not in core.dimension_names:
            raise ConfigError(f"unknown dimension {dim!r}; valid names: {list(core.dimension_names)}")
        super().__init__(core, task, empty_reward, f"{prefix}{dim}", cache, member)
        self.dim = dim

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        batch, empty = self._evaluate(prompts, completions, kwargs)
        return self._values(batch, empty, self.dim)


def multitap_reward(model_or_spec, weights=None, *, base_model=None, heads=None, normalize: str = "none",
                    gates: Sequence = (), momentum: float = 0.99, task: str = "caption", on_invalid="skip",
                    empty_reward: float | str | None = "score", name: str = "multitap",
                    log_dims: bool = True) -> MultiTapReward:
    """A TRL reward function: ``(prompts, completions, **kwargs) -> list[float | None]``.

    Args:
        model_or_spec: a loaded ``MultiTapModel``, a :class:`~multitap_rl.ModelSpec` (device,
            dtype, engine limits, offload, ``shard="zero3"``, ...), or a MULTI-TAP checkpoint
            (directory or hub id) loaded lazily, once per process, on that process's device.
        weights: over ``overall`` and the heads' dimensions (dict, ``"safety=2,clarity=1"``, YAML
            path or preset name); default ``overall=1``. Unknown names raise ``ConfigError`` listing
            the valid ones -- here, not at the first training step.
        base_model, heads: beside a checkpoint path (as for ``MultiTapModel.from_pretrained``).
        normalize: "none" | "fixed" (z-score with the heads' stored statistics) | "running" (EMA,
            with ``momentum``; shared across ranks under torch.distributed).
        gates: e.g. ``["safety<0.5:cap=0"]``.
        task: "caption" (completion = caption) or "instruction" (question = the prompt's last user
            text, completion = response).
        on_invalid: reward of a completion that cannot be scored (no or bad image, a text the
            prompt cannot hold): ``"skip"`` (default: ``None``, which TRL ignores), a float, or
            ``"raise"``.
        empty_reward: what an empty or whitespace-only completion gets: ``"score"`` (default: its
            MULTI-TAP score, as the reference scores every text a policy can emit -- a ``None``
            here would give such completions zero advantage while poor captions get a negative
            one, so a policy could drift toward empty output), or a float / ``None`` of your own.
    """
    core = RewardCore(model_or_spec, base_model=base_model, heads=heads, weights=weights, normalize=normalize,
                      gates=gates, momentum=momentum, on_invalid=on_invalid)
    return MultiTapReward(core, task=task, name=name, empty_reward=empty_reward, log_dims=log_dims)


def multitap_objective_rewards(model_or_spec, dims: Sequence[str] | None = None, *, base_model=None, heads=None,
                               task: str = "caption", on_invalid="skip",
                               empty_reward: float | str | None = "score") -> list[MultiTapObjectiveReward]:
    """One TRL reward function per dimension (``overall`` and each head dimension, or ``dims``),
    named ``multitap_<dim>``. The callables of one call share one model and one forward per batch.
    Pass them with ``GRPOConfig(reward_weights=[...], multi_objective_aggregation=...)``. Other
    arguments as :func:`multitap_reward`."""
    core = RewardCore(model_or_spec, base_model=base_model, heads=heads, on_invalid=on_invalid, combine=False)
    names = core.dimension_names
    if isinstance(dims, str):
        raise ConfigError(f"dims must be a list of dimension names, got the string {dims!r}")
    chosen = list(names if dims is None else dims)
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise ConfigError(f"unknown dimension(s) {unknown}; valid names: {list(names)}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"dimensions repeat in {chosen}: TRL logs rewards by name")
    cache = StepCache(len(chosen))
    return [MultiTapObjectiveReward(core, d, task=task, empty_reward=empty_reward, cache=cache, member=k)
            for k, d in enumerate(chosen)]
