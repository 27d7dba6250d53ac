"""The request pipeline: prepare -> serve -> settle, for both completion endpoints.

``run`` is one request from its head to its last byte::

    prepare   auth -> read the body (size limit, read timeout)
              -> parse, validate -> span starts -> route to a tier
              -> the key's allowed models (404) and tiers (403) -> cache plan
    serve     Idempotency-Key (replay / wait / 409 / 422)
              -> cache lookup (hit) -> join an identical request in flight (coalesced)
              -> rate limits and budget holds, one Redis call (429; ``gateway.budgets``)
              -> admission on the tier or a fallback -> upstream (retries inside)
              -> the answer, whole (``serving.serve_full``) or streamed
                 (``serving.serve_stream``)
    send      the response; then the after-answer work (store it, let followers in)
    settle    exactly once, from the ``finally`` (``gateway.settle``)

Every outcome is recorded on the request's ``RequestContext``; an error,
whatever raised it, becomes one ``GatewayError`` value (``as_gateway_error``)
that renders the response. The client's own JSON is what goes upstream (only
``model`` and a stream's ``stream_options`` are rewritten), so unknown fields
reach vLLM untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cache.idempotency import fingerprint
from gateway.auth import Authenticator, Principal
from gateway.burn_shift import BurnShift
from gateway.caching import CacheLayer, CachePlan
from gateway.context import RequestContext
from gateway.errors import (
    ClientDisconnected,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    as_gateway_error,
)
from gateway.idempotent import idempotency_key
from gateway.request_id import request_id_of
from gateway.schemas import Endpoint, validate
from gateway.serving import Serving
from gateway.settle import Settlement
from gateway.sse import CompletionBuilder
from gateway.stream_shaper import StreamShaper, upstream_stream_options
from gateway.tickets import TicketOffice
from metering.budget import Budget
from metering.telemetry import Content, Telemetry
from router.table import Decision, RouteTable, UnknownModel

log = logging.getLogger("tollway.pipeline")


@dataclass(eq=False, slots=True)
class Prepared:
    """A request ready to serve: what goes upstream, and how it may be cached or replayed."""

    body: bytes  # the JSON sent upstream
    plan: CachePlan
    shaper: StreamShaper | None  # a stream's; None for a whole answer
    idempotency_key: str | None
    idempotency_print: str


class Pipeline:
    def __init__(
        self,
        *,
        auth: Authenticator,
        routes: RouteTable,
        tickets: TicketOffice,
        telemetry: Telemetry,
        caching: CacheLayer,
        burn: BurnShift,
        serving: Serving,
        settlement: Settlement,
        max_body_bytes: int,
        body_read_timeout_s: float,
        tiers: frozenset[str],
        count_route: Callable[[str, float | None], None] | None = None,
    ):
        self.auth = auth
        self.routes = routes
        self.tickets = tickets
        self.telemetry = telemetry
        self.caching = caching
        self.burn = burn
        self.serving = serving
        self.settlement = settlement
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.tiers = tiers
        self.count_route = count_route  # routed-alias decisions, by tier and score

    def exchange(self, request: Request, endpoint: Endpoint) -> Response:
        """What a completion route returns: the whole request, run when Starlette sends it."""
        return _Exchange(self, request, endpoint)

    async def run(self, request: Request, endpoint: Endpoint, send: Send) -> None:
        """Serve one request and send its answer; settle it exactly once, however it ends."""
        ctx = RequestContext(request_id_of(request.scope) or "", endpoint, request.receive)
        try:
            response = await self._respond(ctx, request)
            if response is not None:
                await self._send(ctx, response, request, send)
        finally:
            try:
                await ctx.run_after()  # before settling: it may still add to the GPU bill
            finally:
                self.settlement.settle(ctx)  # even if the after-answer work was cancelled

    @staticmethod
    async def _send(ctx: RequestContext, response: Response, request: Request, send: Send) -> None:
        try:
            await response(request.scope, request.receive, send)
        except OSError:  # an ASGI 2.4 server's word for a client that left: not a bug
            log.info("request %s: the client left before its answer was sent", ctx.request_id)

    async def _respond(self, ctx: RequestContext, request: Request) -> Response | None:
        """The response to send, an error's included; None when the client has gone."""
        try:
            prepared = await self._prepare(ctx, request)
            return await self.serving.serve(ctx, prepared)
        except Exception as exc:  # noqa: BLE001 - the one place errors become answers
            error = as_gateway_error(exc, ctx.request_id)
        ctx.failed(error)
        if isinstance(error, ClientDisconnected):
            log.info("request %s: %s", ctx.request_id, error.message)
            return None
        headers = self.serving.headers(ctx) if ctx.started_work else None
        return error.response(headers)

    async def _prepare(self, ctx: RequestContext, request: Request) -> Prepared:
        """Auth, body and validation, then (with a span) route and cache plan."""
        headers = request.headers
        principal = self.auth.authenticate(headers.get("authorization"))
        ctx.tenant = principal.tenant
        ctx.key_id = principal.key_id
        ctx.allowed_tiers = principal.allowed_tiers
        ctx.key_rates = (principal.requests_per_minute, principal.tokens_per_minute)
        if principal.daily_usd is not None or principal.monthly_usd is not None:
            ctx.key_budget = Budget(principal.daily_usd, principal.monthly_usd)
        raw = await self._read_body(request)
        body = _parse_json(raw)
        parsed = validate(ctx.endpoint, body)
        ctx.max_tokens, ctx.choices = parsed.max_output, parsed.choices
        asked = self.tickets.read_headers(headers)  # priority, deadline (400 if bad)
        idem_key = idempotency_key(headers.get("idempotency-key"))
        # From here on the request is served, or refused, with a span and a report.
        span = ctx.span = self.telemetry.start_request(
            operation=ctx.endpoint.operation,
            request_model=parsed.model,
            request_params=body,
            parent_headers=request.scope["headers"],
        )
        with span.child("tollway.route"):
            forced = headers.get("x-tollway-tier")
            if forced is not None:
                decision, shift = self._force(parsed.model, forced, principal), 0.0
            else:
                decision, shift = self._route(parsed.model, body, principal.tenant)
        ctx.decision = decision
        span.set_route(decision.tier, decision.score, decision.reason)
        _check_access(principal, parsed.model, decision.tier)
        plan = self.caching.plan(
            headers,
            tenant=principal.tenant,
            tier=decision.tier,
            model=decision.model,
            endpoint=ctx.endpoint.value,
            body=body,
        )
        ctx.ticket = self.tickets.issue(principal, decision.tier, asked, ctx.started)
        ctx.cache = plan.status
        if shift > 0:  # budget-aware routing moved the cut points
            ctx.headers["x-tollway-route-shift"] = f"{shift:.4f}"
        if span.wants_content:
            ctx.content = Content(input=body.get("messages", body.get("prompt")))
        idem_print = fingerprint({"path": ctx.endpoint.path, "body": body}) if idem_key else ""
        shaper: StreamShaper | None = None
        if parsed.stream:
            shaper = StreamShaper(body.get("stream_options"), decision.model, span.mark_first_chunk)
            if plan.decision.store:
                shaper.builder = CompletionBuilder()
            body["stream_options"] = upstream_stream_options(body.get("stream_options"))
        if decision.model != parsed.model or shaper is not None:
            body["model"] = decision.model
            raw = orjson.dumps(body)
        return Prepared(raw, plan, shaper, idem_key, idem_print)

    def _force(self, model: str, tier: str, principal: Principal) -> Decision:
        """``x-tollway-tier``: the key must be allowed to pick its tier."""
        if not principal.force_tier:
            raise PermissionDenied("This API key may not choose its tier with x-tollway-tier.")
        if tier not in self.tiers:
            raise InvalidRequest(
                f"x-tollway-tier names no tier: {tier!r} (tiers: {', '.join(sorted(self.tiers))})."
            )
        try:
            return self.routes.force(model, tier)
        except UnknownModel:
            raise _unknown_model(model) from None

    def _route(self, model: str, body: dict[str, Any], tenant: str) -> tuple[Decision, float]:
        """The decision, and how far budget-aware routing moved the cut points."""
        base = self.routes.cut_points
        cuts, shift = (None, 0.0) if base is None else self.burn.cut_points(tenant, base)
        try:
            decision = self.routes.resolve(model, body, cuts)
        except UnknownModel:
            raise _unknown_model(model) from None
        if decision.routed and self.count_route is not None:
            self.count_route(decision.tier, decision.score)
        return decision, shift

    async def _read_body(self, request: Request) -> bytes:
        """The body, within the size limit and ``body_read_timeout_s`` for the whole of it."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequest("The Content-Length header is not a number.")
            if int(declared) > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_read_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(
                            f"The request body exceeds the limit of {limit} bytes."
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {self.body_read_timeout_s:g} s."
            ) from None
        return b"".join(chunks)


class _Exchange(Response):
    """A route's answer that is the request itself: Starlette calls it with the ASGI
    channel, and ``Pipeline.run`` does everything inside that call, so one
    ``try/finally`` holds the request from its body to its last byte."""

    def __init__(self, pipeline: Pipeline, request: Request, endpoint: Endpoint):
        self.pipeline = pipeline
        self.request = request
        self.endpoint = endpoint
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.pipeline.run(self.request, self.endpoint, send)


def _check_access(principal: Principal, model: str, tier: str) -> None:
    """A key's ``allowed_models``: any other model does not exist for it (404, as in
    /v1/models); its ``allowed_tiers``: a request routed elsewhere is refused (403)."""
    if not principal.may_use_model(model):
        raise _unknown_model(model)
    if not principal.may_use_tier(tier):
        raise PermissionDenied(
            f"This API key may not use tier '{tier}', where the model '{model}' was routed."
        )


def _unknown_model(model: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model '{model}' does not exist or you do not have access to it.", param="model"
    )


def _parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}.", code="invalid_json"
        ) from None
