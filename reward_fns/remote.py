"""Scoring through a served MULTI-TAP reward (``multitap-rl serve``), behind the same core.

A server URL goes wherever a checkpoint goes: ``multitap_reward("http://127.0.0.1:8000",
weights=...)``, ``ddpo_reward``, ``rerank``, ``MultiTapScorer``, the verl and flow_grpo adapters
(``model_or_path=``), or ``ModelSpec(checkpoint="http://a:8000,http://b:8000")``. The server
returns raw dimensions; weights, normalisation (running statistics still shared across the
trainer's ranks), gates and ``on_invalid`` are applied here, client-side, so each trainer sets its
own weights against one shared server.

* JSON over HTTP (``multitap_rl.serving.protocol``), never pickle; images sent as their encoded
  bytes (files and bytes as they are, other images as PNG), base64.
* Several URLs (comma-separated): requests are spread over them in turn; a server that does not
  answer (connection refused, timeout, 5xx) is retried on the next one with exponential backoff,
  at most ``MULTITAP_REMOTE_RETRIES`` (default 6) tries per request, each with a
  ``MULTITAP_REMOTE_TIMEOUT`` (default 120 s) timeout; then a clear error naming the URLs. A 4xx
  answer is not retried: its reason is raised.
* A bearer token, when the server wants one, comes from ``MULTITAP_SERVE_TOKEN`` or the file named
  by ``MULTITAP_SERVE_TOKEN_FILE`` -- never from an argument (it would show in process lists).
* ``ModelSpec(fingerprint=...)`` is checked against the server's checkpoint fingerprint.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import torch

from multitap_rl.errors import CheckpointError, ConfigError, DataError, SampleError
from multitap_rl.spec import ModelSpec, server_urls

__all__ = ["RemoteScorer", "ServerError", "request_json"]

logger = logging.getLogger(__name__)


class ServerError(DataError):
    """No served reward answered (every URL and retry tried), or one refused the request."""


def _env_number(name: str, default: float, kind=float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: must be > 0")
    return value


def _token() -> str | None:
    token = os.environ.get("MULTITAP_SERVE_TOKEN")
    path = os.environ.get("MULTITAP_SERVE_TOKEN_FILE")
    if token is None and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"MULTITAP_SERVE_TOKEN_FILE={path!r}: cannot read it ({exc})") from None
    return token or None


def request_json(url: str, path: str, body: dict | None = None, *, timeout: float = 30.0,
                 token: str | None = None) -> tuple[int, dict]:
    """One HTTP request (GET without ``body``, else POST JSON) -> (status, JSON answer). Raises
    ``OSError`` when the server cannot be reached."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's own server URL
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        doc = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        doc = {"error": raw[:200].decode("utf-8", "replace")}
    return status, doc if isinstance(doc, dict) else {"error": f"unexpected answer {doc!r:.200}"}


class RemoteScorer:
    """The scorer of a served model: ``score(images, texts, questions, on_invalid=...)`` returns a
    :class:`~multitap_rl.model.ScoreOutput` as a local model's would (raw dimensions, per-sample
    errors). Holds no model: pickles as its spec."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.urls = server_urls(spec.checkpoint)
        self.timeout = _env_number("MULTITAP_REMOTE_TIMEOUT", 120.0)
        self.retries = int(_env_number("MULTITAP_REMOTE_RETRIES", 6, int))
        self._token = _token()
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._info: dict | None = None

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    # -- transport ------------------------------------------------------------------------------------
    def _call(self, path: str, body: dict | None = None) -> dict:
        """The answer of the first server that answers, trying the URLs in turn with backoff."""
        start = next(self._turn)
        problems = []
        for attempt in range(self.retries):
            url = self.urls[(start + attempt) % len(self.urls)]
            try:
                status, doc = request_json(url, path, body, timeout=self.timeout, token=self._token)
            except OSError as exc:  # refused, reset, timed out: try the next server
                problems.append(f"{url}: {exc}")
            else:
                if status < 300:
                    return doc
                if status < 500:
                    raise ServerError(f"{url}{path} refused the request ({status}): {doc.get('error', doc)}")
                problems.append(f"{url}: HTTP {status} {doc.get('error', '')}")
            if attempt + 1 < self.retries:
                time.sleep(min(8.0, 0.25 * 2 ** attempt))
        raise ServerError(f"no MULTI-TAP server answered {path} after {self.retries} tries over {self.urls}: "
                          f"{problems[-1] if problems else ''}")

    @property
    def info(self) -> dict:
        """The server's ``GET /info`` (fetched once; its fingerprint checked against the spec's)."""
        with self._lock:
            if self._info is None:
                info = self._call("/info")
                want = self.spec.fingerprint
                if want is not None and info.get("fingerprint") != want:
                    raise CheckpointError(f"the server at {self.urls} serves checkpoint {info.get('fingerprint')} "
                                          f"({info.get('checkpoint')}), not the {want} this reward asked for")
                if not isinstance(info.get("dimensions"), list) or info["dimensions"][:1] != ["overall"]:
                    raise ServerError(f"{self.urls}: /info does not list the dimensions (is it a MULTI-TAP server?)")
                self._info = info
            return self._info

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return tuple(self.info["dimensions"])

    @property
    def stats(self) -> dict:
        return {k: tuple(v) for k, v in (self.info.get("heads_stats") or {}).items()}

    @property
    def model(self):
        raise ConfigError(f"this reward scores through a server ({', '.join(self.urls)}); there is no local model")

    # -- scoring -------------------------------------------------------------------------------------
    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None, *,
              on_invalid: str = "raise"):
        """A :class:`~multitap_rl.model.ScoreOutput` over the served model, split into requests of
        at most the server's sample limit."""
        from multitap_rl.model import ScoreOutput
        from multitap_rl.scoring import validate_batch
        from multitap_rl.serving.protocol import encode_image

        names = self.dimension_names
        n = len(texts)
        errors: dict[int, SampleError] = {}
        qs = validate_batch(images, texts, questions, errors)
        encoded: list = []
        for i, image in enumerate(images):
            try:
                encoded.append(None if i in errors else encode_image(image))
            except (SampleError, OSError, ValueError) as exc:
                encoded.append(None)
                errors[i] = exc if isinstance(exc, SampleError) else SampleError(i, "image", str(exc))
        scores = {name: torch.full((n,), float("nan")) for name in names}
        limit = int(self.info.get("limits", {}).get("max_samples") or 256)
        keep = [i for i in range(n) if i not in errors]
        for start in range(0, len(keep), limit):
            part = keep[start:start + limit]
            body = {"images": [encoded[i] for i in part], "texts": [texts[i] for i in part]}
            if questions is not None:
                body["questions"] = [qs[i] for i in part]
            results = self._call("/v1/score", body).get("results")
            if not isinstance(results, list) or len(results) != len(part):
                raise ServerError(f"{self.urls}: /v1/score answered {type(results).__name__} for {len(part)} samples")
            for i, result in zip(part, results):
                if "error" in result:
                    e = result["error"]
                    errors[i] = SampleError(i, str(e.get("field", "sample")), str(e.get("message", "")))
                    continue
                for name in names:
                    value = result.get(name)
                    scores[name][i] = float("nan") if value is None else float(value)
                if any(result.get(name) is None for name in names):
                    errors[i] = SampleError(i, "score", f"the server returned a non-finite score: {result}")
        errors = dict(sorted(errors.items()))
        if errors and on_invalid == "raise":
            raise next(iter(errors.values()))
        for i in errors:
            for v in scores.values():
                v[i] = float("nan")
        return ScoreOutput(scores=scores, errors=errors)
