"""MULTI-TAP rewards for verl (0.9.x: VLM GRPO at scale) and verl-omni (0.2: text-to-image GRPO).

Three entry points, all configured from verl's own config with the flat keywords every
YAML-configured adapter takes (:data:`reward_fns.core.REWARD_KWARGS`: ``model_or_path``,
``base_model``, ``heads``, ``weights``, ``normalize``, ``gates``, ``on_invalid``, ``device``,
``dtype``, engine limits):

* :class:`MultiTapRewardManager` -- a verl reward-loop manager (the contract of verl 0.9.1's
  ``experimental/reward_loop/reward_manager/base.py``), loaded by config::

      reward.reward_manager.source=importlib
      reward.reward_manager.name=MultiTapRewardManager
      reward.reward_manager.module.path=pkg://reward_fns.verl
      +reward.custom_reward_function.reward_kwargs.model_or_path=brl-xfact/Multi-TAP-Qwen2-VL-2B
      +reward.custom_reward_function.reward_kwargs.weights='overall=1,safety=2'

  verl's reward loop awaits ``run_single`` once per finished trajectory, concurrently; the manager
  reads the trajectory's image from ``non_tensor_batch["raw_prompt"]`` (the chat messages verl's
  ``RLHFDataset`` builds: content parts ``{"type": "image", "image": PIL | path}``, or with the
  dataset's ``bytes``), decodes the response (``skip_special_tokens=True``), takes the question
  from the last user message for ``task="instruction"``, and merges concurrent trajectories into
  one engine call (a micro-batcher on the manager's event loop: up to ``max_batch`` samples,
  waiting at most ``max_wait_ms`` for the rest of a GRPO group), so image and prefix sharing apply.
  It returns the weighted reward as ``reward_score`` and every dimension (``overall``, each head)
  plus ``multitap_valid`` in ``reward_extra_info`` -- the same keys for every sample, so verl logs
  them and ``algorithm.adv_estimator=gdpo`` with ``algorithm.gdpo_reward_keys=[overall,safety]``
  reads them with no glue.
* :func:`compute_score` / :func:`compute_score_async` -- verl's custom reward function
  (``reward.custom_reward_function.path=pkg://reward_fns.verl``, ``name=compute_score`` or
  ``compute_score_async``): the image in ``extra_info["image"]`` (path, bytes or PIL) or
  ``extra_info["images"]`` (a list holding one), the question in ``extra_info["question"]``;
  returns ``{"score": weighted reward, <dim>: value, ...}``. The sync function scores one sample
  per call; the async one joins concurrent calls into one engine call, as the manager does.
* :func:`compute_image_score` -- verl-omni 0.2's visual contract, ``async (data_source,
  solution_image, ground_truth, extra_info)``: ``solution_image`` a (C, H, W) float tensor in
  [0, 1] (or any image ``MultiTapModel.score`` takes), ``ground_truth`` the prompt (scored as the
  caption, the text-to-image layout); returns ``{"score", <dim>...}``.

The model loads once per process (each reward worker), on that worker's device, when the first
sample arrives. A sample that cannot be scored gets ``on_invalid`` (default ``0.0``: verl needs a
number for every trajectory) and ``multitap_valid = 0.0``; it never fails the batch. Batching
settings (manager only): ``+reward.custom_reward_function.reward_kwargs.max_batch`` (default 64)
and ``max_wait_ms`` (default 20).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from multitap_rl.errors import ConfigError, MissingDependencyError, SampleError, require

from .core import RewardCore, core_from_kwargs

__all__ = ["MultiTapRewardManager", "compute_image_score", "compute_score", "compute_score_async",
           "messages_image", "messages_question"]

logger = logging.getLogger(__name__)

VALID_KEY = "multitap_valid"
_BATCHING = {"max_batch": 64, "max_wait_ms": 20.0}
# keywords verl itself may add to a custom reward function's call; not MULTI-TAP settings
_VERL_CALL_KWARGS = ("reward_router_address", "reward_model_tokenizer")


def _core(kwargs: dict) -> RewardCore:
    """The process's core for these settings; ``on_invalid`` a float (default 0.0) or "raise"."""
    return core_from_kwargs(invalid_options=("raise",), default_on_invalid=0.0, **kwargs)


def _split_kwargs(reward_kwargs: dict) -> tuple[dict, dict]:
    """(MULTI-TAP settings, batching settings) of verl's reward_kwargs."""
    settings = {k: v for k, v in reward_kwargs.items() if k not in _VERL_CALL_KWARGS}
    batching = {k: settings.pop(k) for k in list(settings) if k in _BATCHING}
    for k, v in batching.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < (1 if k == "max_batch" else 0):
            raise ConfigError(f"{k} must be a {'positive int' if k == 'max_batch' else 'number >= 0'}, got {v!r}")
    return settings, {**_BATCHING, **batching}


def _result(batch, i: int) -> dict[str, float]:
    """Sample ``i`` of a RewardBatch as verl's dict: score, every dimension, validity."""
    valid = i not in batch.errors
    fill = batch.fill if batch.fill is not None else 0.0
    out = {"score": float(batch.reward[i]) if valid else fill}
    for name, values in batch.scores.items():
        out[name] = float(values[i]) if valid else fill
    out[VALID_KEY] = 1.0 if valid else 0.0
    return out


def _evaluate(core: RewardCore, samples: list[tuple]) -> list[dict[str, float]]:
    """One engine call over ``samples`` = [(image, text, question or None, SampleError or None)]."""
    images = [s[0] for s in samples]
    texts = [s[1] for s in samples]
    questions = [s[2] for s in samples]
    invalid = {i: s[3] for i, s in enumerate(samples) if s[3] is not None}
    batch = core.evaluate(images, texts, questions if any(q is not None for q in questions) else None,
                          invalid=invalid, unit="sample")
    return [_result(batch, i) for i in range(len(samples))]


class _MicroBatcher:
    """Joins concurrent ``submit`` calls on one event loop into one engine call: a batch is run when
    ``max_batch`` samples wait, or ``max_wait_ms`` after the first one arrived; the engine call runs
    in the loop's executor (the event loop stays free) and each caller gets its own sample's result."""

    def __init__(self, core: RewardCore, max_batch: int, max_wait_ms: float):
        self.core, self.max_batch, self.max_wait = core, int(max_batch), float(max_wait_ms) / 1000.0
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.calls = 0  # engine calls made (for tests and logs)

    async def submit(self, sample: tuple) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((sample, future))
        if len(self._pending) >= self.max_batch:
            self._flush(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait, self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            self.calls += 1
            loop.create_task(self._run(loop, batch))

    async def _run(self, loop, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        try:
            results = await loop.run_in_executor(None, _evaluate, self.core, [s for s, _ in batch])
        except Exception as exc:  # on_invalid="raise": every sample of this call learns why
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


# -- reading verl's samples --------------------------------------------------------------------------
def _as_list(value) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _parts(message) -> list:
    content = message.get("content") if isinstance(message, dict) else None
    return [] if content is None or isinstance(content, str) else _as_list(content)


def messages_image(messages):
    """The one image of a trajectory's chat messages (verl's ``raw_prompt``): the ``image`` of an
    ``{"type": "image", ...}`` part (a PIL image or a path), else the part itself when it holds the
    dataset's ``bytes``/``path``. Raises ``ValueError`` for no image or several."""
    found = []
    for message in _as_list(messages):
        for part in _parts(message):
            if isinstance(part, dict) and part.get("type") == "image":
                image = part.get("image")
                found.append(image if image is not None else {k: part.get(k) for k in ("bytes", "path")})
    if len(found) != 1:
        raise ValueError(f"{len(found)} images in the prompt's messages; MULTI-TAP scores one image per sample")
    return found[0]


def messages_question(messages) -> str:
    """The text of the last user message (the instruction task's question)."""
    users = [m for m in _as_list(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("no user message in the prompt to take the question from")
    content = users[-1].get("content")
    if isinstance(content, str):
        return content.replace("<image>", "").strip()
    return "".join(p.get("text") or "" for p in _parts(users[-1])
                   if isinstance(p, dict) and p.get("type") == "text").strip()


def _extra_info_image(extra_info: dict):
    if extra_info.get("image") is not None:
        return extra_info["image"]
    images = _as_list(extra_info.get("images"))
    if len(images) != 1:
        raise ValueError(f"extra_info needs 'image' or 'images' with one image, got {len(images)} images")
    return images[0]


# -- the reward manager ------------------------------------------------------------------------------
try:  # verl is optional: without it the manager says which extra brings it
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase as _ManagerBase
except ImportError as _exc:  # pragma: no cover - depends on the environment
    _VERL_IMPORT_ERROR = str(_exc)

    class _ManagerBase:
        def __init__(self, *args, **kwargs):
            require("verl", "verl", "MultiTapRewardManager")  # verl itself missing: name the extra
            raise MissingDependencyError(f"verl is installed but its reward-loop manager cannot be imported "
                                         f"({_VERL_IMPORT_ERROR}); install verl's own requirements")


class MultiTapRewardManager(_ManagerBase):
    """verl's reward-loop manager for MULTI-TAP (see the module docstring). Settings come from
    ``config.reward.custom_reward_function.reward_kwargs``, plus ``task`` ("caption", default, or
    "instruction") and the batching settings ``max_batch`` / ``max_wait_ms``."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, **kwargs):
        super().__init__(config, tokenizer, compute_score)
        settings = _reward_kwargs(config)
        self.task = settings.pop("task", "caption")
        if self.task not in ("caption", "instruction"):
            raise ConfigError(f"task must be 'caption' or 'instruction', got {self.task!r}")
        settings, batching = _split_kwargs(settings)
        self.core = _core(settings)
        self.batcher = _MicroBatcher(self.core, **batching)

    def _sample(self, data) -> tuple:
        """(image, response text, question, SampleError or None) of one trajectory's DataProto."""
        item = data[len(data) - 1]  # multi-turn: the reward is the last sequence's, as verl's naive manager
        responses = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-responses.shape[-1]:].sum())
        text = self.tokenizer.decode(responses[:valid], skip_special_tokens=True)
        messages = item.non_tensor_batch.get("raw_prompt")
        image = question = error = None
        try:
            image = messages_image(messages)
        except ValueError as exc:
            error = SampleError(None, "image", str(exc))
        if self.task == "instruction" and error is None:
            try:
                question = messages_question(messages)
            except ValueError as exc:
                error = SampleError(None, "question", str(exc))
        return image, text, question, error

    async def run_single(self, data) -> dict[str, Any]:
        result = await self.batcher.submit(self._sample(data))
        extra = {k: v for k, v in result.items() if k != "score"}
        return {"reward_score": result["score"], "reward_extra_info": extra}


def _reward_kwargs(config) -> dict:
    reward = config.get("reward") if hasattr(config, "get") else None
    fn = reward.get("custom_reward_function") if reward is not None else None
    kwargs = fn.get("reward_kwargs") if fn is not None else None
    if not kwargs:
        raise ConfigError("MultiTapRewardManager reads its settings from reward.custom_reward_function.reward_kwargs "
                          "(at least model_or_path=<checkpoint>); none are set")
    return {k: v for k, v in kwargs.items()}


# -- custom reward functions -------------------------------------------------------------------------
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **reward_kwargs) -> dict[str, float]:
    """verl's custom reward function, one sample per call (see the module docstring)."""
    settings, _ = _split_kwargs(reward_kwargs)
    core = _core(settings)
    return _evaluate(core, [_text_sample(solution_str, extra_info)])[0]


_BATCHERS: dict[tuple, _MicroBatcher] = {}
_BATCHERS_LOCK = threading.Lock()


def _batcher(settings: dict, batching: dict) -> _MicroBatcher:
    """One micro-batcher per core and event loop (the key holds the loop, so it stays alive)."""
    core = _core(settings)
    key = (core, asyncio.get_running_loop(), tuple(sorted(batching.items())))
    with _BATCHERS_LOCK:
        if key not in _BATCHERS:
            _BATCHERS[key] = _MicroBatcher(core, **batching)
        return _BATCHERS[key]


def _text_sample(solution_str, extra_info) -> tuple:
    extra_info = dict(extra_info or {})
    image, error = None, None
    try:
        image = _extra_info_image(extra_info)
    except ValueError as exc:
        error = SampleError(None, "image", str(exc))
    question = extra_info.get("question")
    return image, solution_str, question, error


async def compute_score_async(data_source, solution_str, ground_truth, extra_info=None,
                              **reward_kwargs) -> dict[str, float]:
    """:func:`compute_score`, async: concurrent calls on one event loop share one engine call."""
    settings, batching = _split_kwargs(reward_kwargs)
    return await _batcher(settings, batching).submit(_text_sample(solution_str, extra_info))


async def compute_image_score(data_source, solution_image, ground_truth, extra_info=None,
                              **reward_kwargs) -> dict[str, float]:
    """verl-omni 0.2's visual reward: the generated image scored against its prompt (``ground_truth``)."""
    settings, batching = _split_kwargs(reward_kwargs)
    error = None
    if not isinstance(ground_truth, str):
        error = SampleError(None, "text", f"the prompt (ground_truth) must be a str, got {type(ground_truth).__name__}")
    sample = (_detached(solution_image), ground_truth if error is None else "", None, error)
    return await _batcher(settings, batching).submit(sample)


def _detached(image):
    """A tensor image off the autograd graph and on CPU (the engine reads pixels only)."""
    return image.detach().cpu() if hasattr(image, "detach") else image
