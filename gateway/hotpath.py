"""The completion endpoints as a plain ASGI app in front of FastAPI.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are the hot path:
measured on one core, FastAPI's middleware stack, dependency solving and
built-in telemetry cost about as much CPU as the whole proxy step
(bench/RESULTS.md). So those two routes go straight to the pipeline, and
every other path (models, health, ready, OpenAPI docs) is served by FastAPI.
Errors still go through ``gateway.errors.error_response``, the one mapping.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import (
    ClientDisconnected,
    NoHealthyUpstream,
    Overloaded,
    UpstreamError,
    error_response,
)
from gateway.request_id import request_id_of
from gateway.schemas import Endpoint
from gateway.services import Services

log = logging.getLogger("tollway.hotpath")

HOT_ROUTES = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
}


class HotPath:
    def __init__(self, fallback: ASGIApp, services: Services):
        self.fallback = fallback
        self.services = services
        self.pipeline = services.pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.fallback(scope, receive, send)
            return
        started = time.monotonic()
        try:
            response = await self.pipeline.handle(Request(scope, receive), endpoint)
        except ClientDisconnected:
            log.info("request %s: client disconnected; upstream cancelled", request_id_of(scope))
            return
        except Exception as exc:  # noqa: BLE001 - the one place errors become responses
            response = error_response(exc, request_id_of(scope))
            if not isinstance(exc, UpstreamError | NoHealthyUpstream | Overloaded):  # metered
                request_id = request_id_of(scope) or ""
                duration = time.monotonic() - started
                self.services.count_refused(response.status_code, request_id, duration)
        await response(scope, receive, send)
