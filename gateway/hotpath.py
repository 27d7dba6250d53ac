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

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ClientDisconnected, error_response
from gateway.pipeline import Pipeline
from gateway.request_id import request_id_of
from gateway.schemas import Endpoint

log = logging.getLogger("tollway.hotpath")

HOT_ROUTES = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
}


class HotPath:
    def __init__(self, fallback: ASGIApp, pipeline: Pipeline):
        self.fallback = fallback
        self.pipeline = pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.fallback(scope, receive, send)
            return
        try:
            response = await self.pipeline.handle(Request(scope, receive), endpoint)
        except ClientDisconnected:
            log.info("request %s: client disconnected; upstream cancelled", request_id_of(scope))
            return
        except Exception as exc:  # noqa: BLE001 - the one place errors become responses
            response = error_response(exc, request_id_of(scope))
        await response(scope, receive, send)
