"""The OpenAI API routes: each takes the pipeline or state from the app and returns its answer.

Error bodies everywhere have the OpenAI shape (see ``gateway.errors``). The
operational endpoints (``/metrics``, ``/ready``, ``/health``) are ``gateway.ops_routes``.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.errors import JSON
from gateway.schemas import Endpoint
from gateway.services import Services

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
