"""What one served replica does, without Ray: load the model once, answer the protocol's requests.

:class:`ScoringService` is the whole request logic (routes, token check, limits, per-sample
errors, the merged engine call); :mod:`multitap_rl.serving.app` only wraps it in a Ray Serve
deployment, whose ``@serve.batch`` hands :meth:`ScoringService.score_many` the samples of many
concurrent requests at once -- one engine call, so GRPO's image and prefix sharing works across
requests and trainer ranks.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ..errors import ConfigError, SampleError
from .protocol import (
    PROTOCOL_VERSION,
    HTTPError,
    ServeLimits,
    decode_openrlhf_request,
    decode_score_request,
    error_result,
    finite_or_none,
)

__all__ = ["RewardSettings", "ScoringService"]

logger = logging.getLogger(__name__)

Item = tuple  # (images, texts, questions or None, {index: (field, message)})


@dataclass(frozen=True)
class RewardSettings:
    """The server-side reward of the OpenRLHF endpoint (its clients send no settings): weights,
    ``normalize`` ("none" or "fixed"; running statistics would mix every client's stream), gates,
    and the reward an invalid sample gets."""

    weights: str | None = None
    normalize: str = "none"
    gates: tuple[str, ...] = ()
    on_invalid: float = 0.0


class ScoringService:
    """One replica's model and request handling.

    Args:
        spec: the :class:`~multitap_rl.spec.ModelSpec` to load (once, here).
        limits: request limits and the allowed root for image paths.
        token: a bearer token every request must carry (None: no token).
        reward: the OpenRLHF endpoint's weights, normalisation, gates and invalid-sample reward.
    """

    def __init__(self, spec, limits: ServeLimits = ServeLimits(), token: str | None = None,
                 reward: RewardSettings = RewardSettings(), *, model=None):
        from ..combiner import RewardCombiner
        from ..errors import check_on_invalid
        from ..model import MultiTapModel

        if reward.normalize not in ("none", "fixed"):
            raise ConfigError("a served reward normalises with 'none' or 'fixed' (running statistics would mix the "
                              "streams of every client; clients normalise their own)")
        self.spec, self.limits, self._token = spec, limits, token
        self.model = model if model is not None else MultiTapModel.from_spec(spec)
        heads = self.model.heads
        self.combiner = RewardCombiner(reward.weights, self.model.dimension_names, normalize=reward.normalize,
                                       stats=dict(heads.stats) if heads is not None else {}, gates=reward.gates)
        self.on_invalid = check_on_invalid(reward.on_invalid, ())

    # -- what the server is ----------------------------------------------------------------------
    def info(self) -> dict:
        from .. import __version__

        heads = self.model.heads
        return {
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "family": self.model.backbone.family,
            "dimensions": list(self.model.dimension_names),
            "fingerprint": self.model.info.get("fingerprint"),
            "checkpoint": self.model.info.get("checkpoint"),
            "dtype": str(self.model.backbone.dtype).replace("torch.", ""),
            "settings": self.model.backbone.settings.as_dict(),
            "heads_stats": {k: list(v) for k, v in (heads.stats if heads is not None else {}).items()},
            "openrlhf_weights": dict(self.combiner.weights.items()),
            "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_samples": self.limits.max_samples,
                       "image_paths": self.limits.allowed_root is not None},
        }

    # -- one engine call for many requests ----------------------------------------------------------
    def score_many(self, items: list[Item]) -> list[list[dict]]:
        """Every request's samples in one ``score`` call; per request, one result per sample
        (``{dim: value}`` or ``{"error": ...}``)."""
        images, texts, questions, owners = [], [], [], []
        results: list[list[dict | None]] = []
        any_question = any(item[2] is not None for item in items)
        for r, (imgs, txts, qs, invalid) in enumerate(items):
            results.append([None] * len(txts))
            for i in range(len(txts)):
                if i in invalid:
                    results[r][i] = error_result(i, *invalid[i])
                    continue
                images.append(imgs[i])
                texts.append(txts[i])
                questions.append(qs[i] if qs is not None else None)
                owners.append((r, i))
        if texts:
            out = self.model.score(images, texts, questions if any_question else None, on_invalid="skip")
            for k, (r, i) in enumerate(owners):
                if k in out.errors:
                    e = out.errors[k]
                    results[r][i] = error_result(i, e.field, e.message)
                else:
                    results[r][i] = {name: finite_or_none(float(v[k])) for name, v in out.scores.items()}
        return results

    def openrlhf(self, results: list[dict]) -> dict:
        """OpenRLHF's response from one request's per-sample results: the weighted reward (the
        server's settings), the same as ``scores``, and each dimension's batch mean in ``extra_logs``."""
        import torch

        valid = [i for i, r in enumerate(results) if "error" not in r]
        fill = self.on_invalid
        rewards = [fill] * len(results)
        logs: dict[str, float] = {}
        if valid:
            dims = {name: torch.tensor([results[i][name] for i in valid], dtype=torch.float32)
                    for name in self.model.dimension_names}
            combined = self.combiner(dims)
            for i, v in zip(valid, combined.reward.tolist()):
                rewards[i] = v
            logs = {name: float(v.mean()) for name, v in dims.items()}
        logs["invalid"] = float(len(results) - len(valid))
        return {"rewards": rewards, "scores": list(rewards), "extra_logs": logs}

    # -- requests -------------------------------------------------------------------------------------
    def _authorize(self, headers: Mapping[str, str]) -> None:
        if self._token is None:
            return
        given = headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[len("Bearer "):], self._token):
            raise HTTPError(401, "missing or wrong bearer token")

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                     score: Callable[[Item], Awaitable[list[dict]]]) -> tuple[int, dict]:
        """(status, JSON document) for one HTTP request; ``score`` runs one request's item (the
        deployment passes its batched method; tests may pass a direct call)."""
        try:
            path = "/" + path.strip("/")
            if path == "/health" and method == "GET":
                return 200, {"status": "ok"}
            self._authorize(headers)
            if path == "/info" and method == "GET":
                return 200, self.info()
            if path in ("/v1/score", "/openrlhf"):
                if method != "POST":
                    raise HTTPError(405, f"{path} takes POST")
                decode = decode_score_request if path == "/v1/score" else decode_openrlhf_request
                item = decode(body, self.limits)
                results = await score(item)
                return 200, ({"results": results} if path == "/v1/score" else self.openrlhf(results))
            raise HTTPError(404, f"no route {method} {path}; routes: GET /health, GET /info, POST /v1/score, "
                                 "POST /openrlhf")
        except HTTPError as exc:
            return exc.status, {"error": exc.reason}
        except (ConfigError, SampleError) as exc:  # a request the model cannot take as a whole
            return 400, {"error": str(exc)}
