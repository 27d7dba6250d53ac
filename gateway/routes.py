"""HTTP routes: each takes the pipeline or state from the app and returns its answer.

Error bodies everywhere have the OpenAI shape (see ``gateway.errors``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from cache.ledger import GroupBy, LedgerUnavailable, UsageRow, totals
from gateway.errors import JSON, InvalidRequest, PermissionDenied, ServiceUnavailable
from gateway.schemas import Endpoint
from gateway.services import Services
from metering.money import fmt
from metering.occupancy import OccupancySnapshot

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in {
        400: "malformed JSON or an invalid field (`param` names it)",
        401: "missing or wrong API key",
        404: "unknown model",
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
    services = _services(request)
    services.auth.authenticate(request.headers.get("authorization"))
    created = int(services.started_at)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "tollway"}
        for name in services.routes.model_names()
    ]
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


GROUPS: tuple[GroupBy, ...] = get_args(GroupBy)


def _when(value: str | None, default: datetime, param: str) -> datetime:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"'{param}' must be an ISO 8601 date or time, e.g. 2026-11-01 or 2026-11-01T13:00Z.",
            param=param,
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get(
    "/v1/usage",
    responses={
        400: _ERRORS[400],
        401: _ERRORS[401],
        403: {"description": "another tenant's usage"},
        503: {"description": "the ledger (Redis) is down"},
    },
)
async def usage(
    request: Request,
    group_by: str = "tenant",
    start: str | None = None,
    end: str | None = None,
    tenant: str | None = None,
) -> Response:
    """Sums of metered usage over ``[start, end)`` (UTC, whole hours), grouped.

    Defaults: from the start of the current UTC day to now. An admin key sees
    every tenant (or one, with ``tenant=``); any other key sees its own only.
    """
    services = _services(request)
    principal = services.auth.authenticate(request.headers.get("authorization"))
    group = next((g for g in GROUPS if g == group_by), None)
    if group is None:
        raise InvalidRequest(f"'group_by' must be one of {', '.join(GROUPS)}.", param="group_by")
    now = datetime.now(UTC)
    since = _when(start, now.replace(hour=0, minute=0, second=0, microsecond=0), "start")
    until = _when(end, now + timedelta(hours=1), "end")
    if until <= since:
        raise InvalidRequest("'end' must be after 'start'.", param="end")
    if not principal.admin:
        if tenant not in (None, principal.tenant):
            raise PermissionDenied("This API key may only read its own tenant's usage.")
        tenant = principal.tenant
    try:
        rows = await services.ledger.query(
            group_by=group,
            start=since,
            end=until,
            tenant=tenant,
        )
    except LedgerUnavailable:
        raise ServiceUnavailable("The usage ledger (Redis) is not reachable right now.") from None
    return _json(
        {
            "object": "usage",
            "group_by": group_by,
            "start": since.isoformat(),
            "end": until.isoformat(),
            "tenant": tenant,
            "data": [_usage_row(row) for row in rows],
            "total": _usage_row(totals(rows)),
        }
    )


def _usage_row(row: UsageRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_prompt_tokens": row.cached_tokens,
        "gpu_seconds": row.gpu_seconds,
        "cost_usd": fmt(row.cost_usd),
        "cost_loaded_usd": fmt(row.cost_loaded_usd),
        "saved_usd": fmt(row.saved_usd),
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
