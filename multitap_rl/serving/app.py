"""The served reward on Ray Serve: one deployment, one model per replica, dynamic batching.

Ray Serve supplies what a served reward needs and a home-made server would not: replicas over
nodes and GPUs, autoscaling, health checks and restarts, and ``@serve.batch``, which merges the
samples of concurrent requests (many trainer ranks, many GRPO groups) into one engine call. The
request logic itself is :class:`~multitap_rl.serving.service.ScoringService`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..errors import require
from .protocol import ServeLimits
from .service import RewardSettings, ScoringService

__all__ = ["ServeOptions", "build_app", "run"]

logger = logging.getLogger(__name__)

APP_NAME = "multitap"


@dataclass(frozen=True)
class ServeOptions:
    """How the deployment runs: replicas (a fixed number, or autoscaling between ``min_replicas``
    and ``max_replicas``), resources per replica, and the dynamic batch (``max_batch_size``
    requests merged, waiting at most ``batch_wait_timeout_s`` for them)."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64
    extra_actor_options: dict = field(default_factory=dict)

    def deployment_options(self) -> dict:
        actor = {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus, **self.extra_actor_options}
        out = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.min_replicas is not None or self.max_replicas is not None:
            lo = self.min_replicas if self.min_replicas is not None else 1
            hi = self.max_replicas if self.max_replicas is not None else max(lo, self.replicas)
            out["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi}
        else:
            out["num_replicas"] = self.replicas
        return out


def build_app(spec, *, limits: ServeLimits = ServeLimits(), token: str | None = None,
              reward: RewardSettings = RewardSettings(), options: ServeOptions = ServeOptions()):
    """The Ray Serve application (a bound deployment) serving ``spec``; run it with
    :func:`run` or ``serve.run``. Every replica loads the model from the spec on its own device."""
    require("ray.serve", "serve", "multitap-rl serve")
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(name="MultiTapReward")
    class MultiTapReward:
        def __init__(self, spec, limits, token, reward, max_batch_size, batch_wait_timeout_s):
            self.service = ScoringService(spec, limits, token, reward)
            self.score_batch.set_max_batch_size(max_batch_size)
            self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def score_batch(self, items: list) -> list:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.service.score_many, items)

        async def __call__(self, request):
            body = await request.body()
            status, doc = await self.service.handle(request.method, request.url.path, request.headers, body,
                                                    self.score_batch)
            return JSONResponse(doc, status_code=status)

    return MultiTapReward.options(**options.deployment_options()).bind(
        spec, limits, token, reward, options.max_batch_size, options.batch_wait_timeout_s)


def run(app, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, blocking: bool = False):
    """Start (or join, with ``address``) Ray, serve ``app`` on ``host:port`` and wait until every
    replica is up. ``blocking``: serve until interrupted."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    logger.info("MULTI-TAP reward served on http://%s:%d", host, port)
    return handle


def shutdown() -> None:
    """Stop serving and leave Ray (what :func:`run` started)."""
    import ray
    from ray import serve

    serve.shutdown()
    if ray.is_initialized():
        ray.shutdown()
