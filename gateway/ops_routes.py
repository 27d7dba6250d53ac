"""The operational endpoints: ``/metrics``, ``/ready`` and ``/health``, and who may read them.

``/metrics`` and the detailed ``/ready`` show every tenant's spend and every
replica's URL and last error, so where they are served decides who reads them:

- the public listener (``public_router``): ``/metrics`` needs the bearer
  ``ops.metrics_token`` (401 otherwise, in the OpenAI error shape), unless
  ``ops.metrics_public`` opts out; ``/ready`` answers the detailed body to the
  token, and only ``{"status": ...}`` to anyone else;
- the admin listener (``ops.admin_listen``, ``admin_router``): both, to
  anyone who can reach it, which is why it binds to loopback by default.

``/health`` (liveness) says nothing about anyone and is served on both.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.config import OpsConfig
from gateway.errors import AuthenticationFailed
from gateway.routes import _json, _services
from gateway.services import Services
from metering.occupancy import OccupancySnapshot

public_router = APIRouter()
admin_router = APIRouter()

_METRICS_REFUSED: dict[int | str, dict[str, Any]] = {
    401: {"description": "no metrics token, or a wrong one (`ops.metrics_token`)"}
}
_READY: dict[int | str, dict[str, Any]] = {
    503: {"description": "some tier has no available replica"}
}


class MetricsAccess:
    """Whether a request to the public listener may read the operational figures."""

    def __init__(self, config: OpsConfig):
        self._token = None if config.metrics_token is None else config.metrics_token.encode()
        self._public = config.metrics_public

    def allows(self, authorization: str | None) -> bool:
        if self._public:
            return True
        if self._token is None or not authorization:
            return False
        scheme, _, secret = authorization.partition(" ")
        # Constant time: a guess learns nothing from how long the refusal took.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            secret.strip().encode(), self._token
        )

    def check(self, authorization: str | None) -> None:
        if self.allows(authorization):
            return
        if self._token is None:
            raise AuthenticationFailed(
                "/metrics is not served on this listener: configure ops.metrics_token "
                "(then send 'Authorization: Bearer <token>') or ops.admin_listen.",
                code="metrics_token_required",
            )
        raise AuthenticationFailed(
            "Missing or incorrect metrics token: send 'Authorization: Bearer <ops.metrics_token>'.",
            code="invalid_metrics_token",
        )


def _access(request: Request) -> MetricsAccess:
    access: MetricsAccess = request.app.state.metrics_access
    return access


def _metrics(services: Services) -> Response:
    services.recorder.drain()  # every request answered so far is counted
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type)


def _occupancy(snap: OccupancySnapshot) -> dict[str, float]:
    """The replica's GPU time since the gateway started: busy (by whom) and idle."""
    return {
        "wall_s": snap.wall_s,
        "gpus": snap.gpus,
        "attributed_gpu_s": snap.attributed_gpu_s,
        "accrued_gpu_s": snap.accrued_gpu_s,
        "foreign_gpu_s": snap.foreign_gpu_s,
        "idle_gpu_s": snap.idle_gpu_s,
    }


def readiness(services: Services) -> dict[str, Any]:
    """The detailed readiness body: each tier's replicas, their health, load and GPU time.

    Ready when every tier has at least one available (healthy, not ejected) replica."""
    now = time.monotonic()
    tiers = {
        pool.name: {
            "healthy_replicas": len(pool.available(now)),
            "queue_depth": services.scheduler.depth(pool.name),
            "replicas": [
                {
                    "url": r.url,
                    "healthy": r.healthy,
                    "ejected": r.ejected(now),
                    "ejected_for_s": round(max(0.0, r.ejected_until - now), 3),
                    "available": r.available(now),
                    "in_flight": r.in_flight,
                    "slots": r.slots,
                    "foreign": r.foreign,
                    "error": r.last_error,
                    "occupancy": _occupancy(r.meter.snapshot(now)),
                    "vllm": None
                    if r.vllm is None
                    else {
                        "running": r.vllm.running,
                        "waiting": r.vllm.waiting,
                        "kv_cache_usage": r.vllm.kv_cache_usage,
                    },
                }
                for r in pool.replicas
            ],
        }
        for pool in services.pools
    }
    ok = all(t["healthy_replicas"] for t in tiers.values())
    return {
        "status": "ready" if ok else "not_ready",
        "uptime_s": time.time() - services.started_at,
        "tiers": tiers,
    }


def _ready(body: dict[str, Any]) -> Response:
    return _json(body, 200 if body["status"] == "ready" else 503)


@public_router.get("/health")
@admin_router.get("/health")
async def health() -> Response:
    """Liveness: the process answers. Says nothing about upstreams (see /ready)."""
    return _json({"status": "ok"})


@public_router.get("/metrics", responses=_METRICS_REFUSED)
async def public_metrics(request: Request) -> Response:
    """Prometheus exposition, to the metrics token. Async on purpose: it reads the
    occupancy ledgers on the loop."""
    _access(request).check(request.headers.get("authorization"))
    return _metrics(_services(request))


@public_router.get("/ready", responses=_READY)
async def public_ready(request: Request) -> Response:
    """Readiness: ``{"status": "ready"|"not_ready"}``; the detailed body to the metrics token."""
    body = readiness(_services(request))
    if _access(request).allows(request.headers.get("authorization")):
        return _ready(body)
    return _ready({"status": body["status"]})


@admin_router.get("/metrics")
async def admin_metrics(request: Request) -> Response:
    """Prometheus exposition."""
    return _metrics(_services(request))


@admin_router.get("/ready", responses=_READY)
async def admin_ready(request: Request) -> Response:
    """Readiness, detailed: every tier's replicas, their health, load and GPU time."""
    return _ready(readiness(_services(request)))
