"""HTTP routes: each takes the pipeline or state from the app and returns its answer.

Error bodies everywhere have the OpenAI shape (see ``gateway.errors``).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.errors import JSON
from gateway.schemas import Endpoint
from gateway.services import Services
from metering.occupancy import OccupancySnapshot

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in {
        400: "malformed JSON or an invalid field (`param` names it)",
        401: "missing or wrong API key",
        403: "the key may not use the tier the request was routed or forced to",
        404: "unknown model, or one the key may not use (its `allowed_models`)",
        408: "the body did not arrive within `limits.body_read_timeout_s`",
        409: "a request with this Idempotency-Key is still running",
        413: "body over `limits.max_body_bytes`",
        422: "the Idempotency-Key was used with another body",
        429: "a budget is spent, or the tier cannot start the request within its deadline",
        502: "upstream failed after retries",
        503: "no healthy replica for the tier",
        504: "upstream timed out",
    }.items()
}


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=JSON)


@router.post("/v1/chat/completions", responses=_ERRORS, response_model=None)
async def chat_completions(request: Request) -> Response:
    return _services(request).pipeline.exchange(request, Endpoint.CHAT)


@router.post("/v1/completions", responses=_ERRORS, response_model=None)
async def completions(request: Request) -> Response:
    return _services(request).pipeline.exchange(request, Endpoint.COMPLETIONS)


@router.get("/v1/models", responses={401: _ERRORS[401]})
async def list_models(request: Request) -> Response:
    """The models this key may use: its ``allowed_models``, served by its ``allowed_tiers``
    (an alias is listed if allowed: where it routes is known per request only)."""
    services = _services(request)
    principal = services.auth.authenticate(request.headers.get("authorization"))
    created = int(services.started_at)
    data = []
    for name in services.routes.model_names():
        decision = services.routes.resolve(name)
        if principal.may_use_model(name) and (
            decision.routed or principal.may_use_tier(decision.tier)
        ):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "tollway"})
    return _json({"object": "list", "data": data})


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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition. Async on purpose: it reads the occupancy ledgers on the loop."""
    services = _services(request)
    services.recorder.drain()  # every request answered so far is counted
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/health")
async def health() -> Response:
    """Liveness: the process answers. Says nothing about upstreams (see /ready)."""
    return _json({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Readiness: every tier has at least one available (healthy, not ejected) replica."""
    services = _services(request)
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
    return _json(
        {
            "status": "ready" if ok else "not_ready",
            "uptime_s": time.time() - services.started_at,
            "tiers": tiers,
        },
        200 if ok else 503,
    )
