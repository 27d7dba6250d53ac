"""``create_app(settings)``: the gateway's ASGI app, its lifespan and its error handlers.

Nothing is configured at import time. The lifespan opens the upstream pool
and health checks before the first request and closes them after the last.
``create_apps`` adds the admin listener's app (``ops.admin_listen``): the
operational endpoints on the same ``Services``, without a lifespan of its own.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from gateway import admin_routes, ops_routes, usage_routes
from gateway.config import Settings
from gateway.errors import GatewayError, MethodNotAllowed, RouteNotFound, error_response
from gateway.request_id import RequestIdMiddleware, request_id_of
from gateway.routes import router
from gateway.services import Services


def create_app(settings: Settings) -> ASGIApp:
    """The gateway as an ASGI app: request ids, then FastAPI's routes."""
    return create_apps(settings).public


@dataclass(frozen=True, slots=True)
class Apps:
    public: ASGIApp  # owns the lifespan, hence the services
    admin: ASGIApp | None  # None: no ops.admin_listen


def create_apps(settings: Settings) -> Apps:
    """The public app and, if ``ops.admin_listen`` is set, the admin listener's, sharing
    one ``Services``."""
    services = Services.build(settings)
    admin = None
    if settings.ops.admin_listen is not None:
        admin = RequestIdMiddleware(create_admin_api(services))
    return Apps(RequestIdMiddleware(create_api(services)), admin)


# Collect the youngest generation after 50,000 new container objects instead of
# CPython's 700. A request allocates a few hundred, nearly all freed by reference
# counting as it ends, so at 700 the collector ran every few requests and, worse,
# promoted what was merely in flight (request state, reports queued for the
# ledger) into the older generations it then scanned again and again, a few
# per cent of the gateway's CPU. Cycles are still collected, a moment later.
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """The process's collector policy, once everything long-lived is built."""
    # Everything built so far lives as long as the process: take it out of the
    # collector's scans, or full collections stall the loop for tens of ms (p99).
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_api(services: Services) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        tune_gc()
        try:
            yield
        finally:
            await services.stop()

    docs = services.settings.ops.docs
    app = FastAPI(
        title="tollway",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,  # None also turns off /docs and /redoc
    )
    app.state.services = services
    app.state.metrics_access = ops_routes.MetricsAccess(services.settings.ops)
    app.include_router(router)
    app.include_router(ops_routes.public_router)
    app.include_router(usage_routes.router)
    app.include_router(admin_routes.router)
    _answer_errors(app)
    return app


def create_admin_api(services: Services) -> FastAPI:
    """The admin listener: ``/metrics``, the detailed ``/ready`` and ``/health``, to anyone
    who reaches it. No lifespan (the public app's owns ``services``) and no API docs."""
    app = FastAPI(title="tollway admin", openapi_url=None)
    app.state.services = services
    app.include_router(ops_routes.admin_router)
    _answer_errors(app)
    return app


async def _on_error(request: Request, exc: Exception) -> Response:
    return error_response(exc, request_id_of(request.scope))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed."))
    if exc.status_code == 404:
        return error_response(RouteNotFound(f"No route for {request.url.path}."))
    return error_response(exc)


def _answer_errors(app: FastAPI) -> None:
    # GatewayError is expected (a 4xx, a dead upstream): answered, not re-raised.
    # Any other Exception reaches Starlette's ServerErrorMiddleware: answered
    # as a generic 500 by the same function, and logged with its trace.
    app.add_exception_handler(GatewayError, _on_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_error)
