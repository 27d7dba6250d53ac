"""The request pipeline: one path from an HTTP request to an upstream answer.

auth -> budget (429) -> read body (size limit) -> parse JSON -> validate
-> route to a tier -> cache plan -> Idempotency-Key (replay / wait / 409 / 422)
-> cache lookup -> join an identical request in flight (coalesce)
-> admission: a slot on a replica of the tier, or of a fallback tier (queue, 429)
-> send (retries inside the upstream client) -> relay -> meter.

Both completion endpoints share it; routes only pick the ``Endpoint``. The
client's own JSON is what goes upstream (only ``model`` is rewritten when an
alias was routed), so unknown fields reach vLLM untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from cache.idempotency import fingerprint
from cache.response_cache import CachedResponse
from cache.sse import DONE, CompletionBuilder, chunks_from_completion
from gateway.admission import Scheduler, Slot
from gateway.auth import Authenticator, Principal
from gateway.budgets import BudgetGuard
from gateway.burn_shift import BurnShift
from gateway.caching import CacheLayer, CachePlan
from gateway.disconnect import cancel_on_disconnect
from gateway.errors import (
    JSON,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NoHealthyUpstream,
    PayloadTooLarge,
    PermissionDenied,
    UpstreamError,
)
from gateway.head_lines import FiguresResponse
from gateway.idempotent import IdempotencyLayer, idempotency_key
from gateway.meter import Meter, RequestContext
from gateway.pool import Pools
from gateway.request_id import request_id_of
from gateway.schemas import Endpoint, validate
from gateway.stream_shaper import StreamShaper, upstream_stream_options
from gateway.streaming import EventStreamResponse, StreamEnd, relay_events
from gateway.tickets import TicketOffice
from gateway.upstream import UpstreamClient, UpstreamReply
from gateway.upstream_errors import upstream_failure
from metering.telemetry import INERT, Content, Telemetry
from metering.usage import TokenUsage, names_model, usage_in
from router.table import Decision, RouteTable, UnknownModel

log = logging.getLogger("tollway.pipeline")


class Pipeline:
    def __init__(
        self,
        *,
        auth: Authenticator,
        routes: RouteTable,
        pools: Pools,
        scheduler: Scheduler,
        tickets: TicketOffice,
        upstream: UpstreamClient,
        meter: Meter,
        telemetry: Telemetry,
        budgets: BudgetGuard,
        caching: CacheLayer,
        idempotency: IdempotencyLayer | None,
        burn: BurnShift,
        max_body_bytes: int,
        count_route: Callable[[str, float | None], None] | None = None,
    ):
        self.burn = burn
        self.count_route = count_route  # routed-alias decisions, by tier and score
        self.caching = caching
        self.idempotency = idempotency
        self.telemetry = telemetry
        self.budgets = budgets
        self.auth = auth
        self.routes = routes
        self.pools = pools
        self.scheduler = scheduler
        self.tickets = tickets
        # Each tier's admission candidates: itself, then its fallbacks in order.
        self.candidates = {
            pool.name: [pool, *(pools.tiers[name] for name in pool.tier.fallback)] for pool in pools
        }
        self.upstream = upstream
        self.meter = meter
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        principal = self.auth.authenticate(request.headers.get("authorization"))
        budget = self.budgets.check(principal.tenant)  # 429 when spent
        raw = await self._read_body(request)
        body = _parse_json(raw)
        parsed = validate(endpoint, body)
        asked = self.tickets.read_headers(request.headers)  # priority, deadline (400 if bad)
        idem_key = idempotency_key(request.headers.get("idempotency-key"))
        idem_print = fingerprint({"path": endpoint.path, "body": body}) if idem_key else ""
        span = self.telemetry.start_request(
            operation=endpoint.operation,
            request_model=parsed.model,
            request_params=body,
            parent_headers=request.scope["headers"],  # a list, once ``request.headers`` is read
        )
        try:
            with span.child("tollway.route"):
                forced = request.headers.get("x-tollway-tier")
                if forced is not None:
                    decision, shift = self._force(parsed.model, forced, principal), 0.0
                else:
                    decision, shift = self._route(parsed.model, body, principal.tenant)
            plan = self.caching.plan(
                request.headers,
                tenant=principal.tenant,
                tier=decision.tier,
                model=decision.model,
                endpoint=endpoint.value,
                body=body,
            )
        except GatewayError as exc:  # a started span is always ended
            span.fail(exc.code or type(exc).__name__)
            raise
        span.set_route(decision.tier, decision.score, decision.reason)
        request_id = request_id_of(request.scope) or ""
        ctx = RequestContext(request_id, principal.tenant, endpoint, decision, span=span)
        ctx.ticket = self.tickets.issue(principal, decision.tier, asked, ctx.started)
        if shift > 0:  # budget-aware routing moved the cut points
            ctx.headers["x-tollway-route-shift"] = f"{shift:.4f}"
        ctx.cache = plan.status
        if span.wants_content:
            ctx.content = Content(input=body.get("messages", body.get("prompt")))
        shaper: StreamShaper | None = None
        if parsed.stream:
            options = body.get("stream_options")
            shaper = StreamShaper(options, decision.model, span.mark_first_chunk)
            if plan.decision.store:
                shaper.builder = CompletionBuilder()
            body["stream_options"] = upstream_stream_options(body.get("stream_options"))
        if decision.model != parsed.model or shaper is not None:
            body["model"] = decision.model
            raw = orjson.dumps(body)
        if budget is not None:
            ctx.headers.update(budget.headers())

        ctx.receive = request.receive

        def serve() -> Awaitable[Response]:
            return self._serve(ctx, raw, shaper, plan)

        if idem_key is not None and self.idempotency is not None:
            return await self.idempotency.run(ctx, idem_key, idem_print, serve)
        return await serve()

    async def _serve(
        self, ctx: RequestContext, raw: bytes, shaper: StreamShaper | None, plan: CachePlan
    ) -> Response:
        """The cache, then identical requests in flight, then (on a miss) the upstream."""
        hit = None
        if plan.decision.lookup:
            with ctx.span.child("tollway.cache_lookup") if ctx.span else INERT as step:
                hit = await self.caching.lookup(plan)
                step.set_attribute("tollway.cache", "hit" if hit else "miss")
            self.caching.on_event(ctx.decision.tier, "hit" if hit else "miss")
        else:
            self.caching.on_event(ctx.decision.tier, "bypass")
        if hit is not None:
            return self._replay(ctx, hit, shaper, "hit")
        # From here on the request may wait for, or run, GPU work: stop it if the
        # client leaves (a cache lookup is bounded by its Redis budget).
        assert ctx.receive is not None
        return await cancel_on_disconnect(self._fly(ctx, raw, shaper, plan), ctx.receive)

    async def _fly(
        self, ctx: RequestContext, raw: bytes, shaper: StreamShaper | None, plan: CachePlan
    ) -> Response:
        """Join an identical request in flight, or go upstream (and let followers in)."""
        flight = await self.caching.join_flight(plan)
        if isinstance(flight, CachedResponse):
            self.caching.on_event(ctx.decision.tier, "coalesced")
            return self._replay(ctx, flight, shaper, "coalesced")
        try:
            response = await self._forward(ctx, raw, shaper, plan)
        except BaseException:
            await self.caching.land(plan, flight)
            raise
        if flight is not None:
            land = functools.partial(self.caching.land, plan, flight)
            if isinstance(response, EventStreamResponse):
                response.events = _then(response.events, land)
            else:  # after the answer is stored (its background task), followers may look
                response.background = _chain(response.background, land)
        return response

    def _replay(
        self, ctx: RequestContext, hit: CachedResponse, shaper: StreamShaper | None, status: str
    ) -> Response:
        """Answer from a stored completion, as JSON or as a stream, at zero cost."""
        now = time.time()
        ctx.cache = status
        completion = {**hit.completion, "model": ctx.decision.model}
        report = ctx.report = self.meter.finish(
            ctx,
            replica=None,
            usage=TokenUsage(hit.prompt_tokens, hit.completion_tokens),
            status=200,
            finish_reasons=_finish_reasons(completion),
            response_id=completion.get("id"),
            saved=hit.cost_usd,
        )
        headers = {**_report_headers(ctx.decision), **ctx.headers, "x-tollway-cache": status}
        headers.update(self.meter.headers(report))
        headers.update(self.budgets.spend(report))
        if status == "hit":
            headers["age"] = str(hit.age_s(now))
        if shaper is None:
            return Response(orjson.dumps(completion), headers=headers, media_type=JSON)
        events: list[bytes] = []
        for event in chunks_from_completion(completion, include_usage=True)[:-1]:
            events += shaper.feed(event)
        events += shaper.finish(self.meter.stream_object(report))
        events.append(DONE)
        return EventStreamResponse(_replay_events(events), headers)

    async def _admit(
        self, ctx: RequestContext, raw: bytes, routed: Decision, fallen: bool = False
    ) -> tuple[Slot, bytes]:
        """A slot for the request: on its tier, or on a fallback tier (then re-addressed).

        ``fallen``: the routed tier lost its last replica under the request; only
        its fallbacks are candidates now.
        """
        assert ctx.ticket is not None
        candidates = self.candidates[routed.tier]
        slot = await self.scheduler.acquire(
            candidates[1:] if fallen else candidates,
            ctx.ticket,
            ctx.span,
            fallen_from=routed.tier if fallen else None,
        )
        if slot.fallback is None:
            return slot, raw
        tier = slot.pool.tier
        ctx.decision = dataclasses.replace(
            routed, tier=tier.name, model=tier.models[0], reason=f"fallback: {slot.fallback}"
        )
        ctx.headers["x-tollway-fallback-from"] = routed.tier
        ctx.headers["x-tollway-fallback-reason"] = slot.fallback
        if ctx.span is not None:
            ctx.span.set_route(tier.name, routed.score, routed.reason)
            ctx.span.annotate(
                {"tollway.fallback.from": routed.tier, "tollway.fallback.reason": slot.fallback}
            )
        body = orjson.loads(raw)
        body["model"] = tier.models[0]
        return slot, orjson.dumps(body)

    async def _send(
        self, ctx: RequestContext, raw: bytes, stream: bool
    ) -> tuple[UpstreamReply, dict[str, str]]:
        """Admission, then the upstream call; falls back once more if the tier dies under it."""
        assert ctx.ticket is not None
        routed = ctx.decision
        slot, body = await self._admit(ctx, raw, routed)
        try:
            reply = await self._post(ctx, slot, body, stream)
        except NoHealthyUpstream:
            if slot.fallback is not None or len(self.candidates[routed.tier]) == 1:
                raise
            # Its attempts ejected the tier's last replica: the fallbacks may still serve it.
            slot, body = await self._admit(ctx, raw, routed, fallen=True)
            reply = await self._post(ctx, slot, body, stream)
        headers = {**_report_headers(ctx.decision), **ctx.headers, "x-tollway-cache": ctx.cache}
        return reply, headers

    def _post(
        self, ctx: RequestContext, slot: Slot, body: bytes, stream: bool
    ) -> Awaitable[UpstreamReply]:
        assert ctx.ticket is not None
        return self.upstream.send(
            slot,
            ctx.ticket,
            ctx.endpoint.path,
            body,
            {"content-type": JSON, "x-request-id": ctx.request_id},
            stream=stream,
            bill=ctx.bill,
            trace=ctx.span,
        )

    async def _forward(
        self, ctx: RequestContext, raw: bytes, shaper: StreamShaper | None, plan: CachePlan
    ) -> Response:
        reply: UpstreamReply | None = None
        try:
            reply, headers = await self._send(ctx, raw, shaper is not None)
            if shaper is not None and reply.status == 200:
                events = relay_events(reply, shaper, self._stream_end(ctx, reply, shaper))
                store = functools.partial(self._store_stream, ctx, shaper, plan)
                return EventStreamResponse(_then(events, store), headers)
            data = await reply.read()
        except BaseException as exc:
            # The request occupied replicas (failed attempts, or a client that
            # left): meter what it used, then let the error take its course.
            status = exc.status if isinstance(exc, GatewayError) else 499
            report = self.meter.finish(
                ctx,
                replica=reply.replica if reply else None,
                usage=None,
                status=status,
                error_type=type(exc).__name__,
            )
            self.budgets.spend(report)
            raise
        if (
            not self.meter.enabled  # nothing to read, unless to store or to rename it
            and reply.status == 200
            and not plan.decision.store
            and names_model(data, ctx.decision.model)
        ):
            return Response(data, headers=headers, media_type=JSON)
        if reply.status != 200:
            response = upstream_failure(reply, data, headers)
            report = self.meter.finish(
                ctx, replica=reply.replica, usage=None, status=response.status_code,
                error_type=f"upstream_{reply.status}",
            )  # fmt: skip
            response.headers.update(self.meter.headers(report))
            response.headers.update(self.budgets.spend(report))
            return response
        traced = ctx.span is not None and ctx.span.traced  # a span reads the answer's details
        usage = None
        if self.meter.enabled and not (traced or plan.decision.store or ctx.content):
            budgeted = self.budgets.active
            relayed = self.meter.relay(ctx, reply.replica, data, report=budgeted)  # unread
            if relayed is not None:  # most answers: priced, counted and their lines spelled
                relayed_report, lines = relayed
                if budgeted and relayed_report is not None:
                    headers.update(self.budgets.spend(relayed_report))
                response = FiguresResponse(data, 200, headers)
                response.head_lines = lines
                return response
            usage = usage_in(data, ctx.decision.model)  # a free or token-priced answer's
        completion = None
        if usage is None:
            completion = _json_object(data)
            if ctx.content is not None:
                ctx.content = Content(ctx.content.input, completion.get("choices") or ())
            if completion.get("model") != ctx.decision.model:
                # vLLM names its first --served-model-name whatever alias was asked for.
                completion["model"] = ctx.decision.model
                data = orjson.dumps(completion)
            usage = TokenUsage.from_openai(completion.get("usage"))
        if traced and completion is not None:  # the span reads these
            reasons = _finish_reasons(completion)
            report = self.meter.finish(
                ctx, reply.replica, usage, 200, reasons, completion.get("id")
            )
        else:
            report = self.meter.finish(ctx, reply.replica, usage, 200)
        if self.budgets.active:
            headers.update(self.budgets.spend(report))
        # tier and model are in ``headers``; the figures go as one block of head lines
        response = FiguresResponse(data, 200, headers)
        if self.meter.enabled:
            response.head_lines = report.head_lines()
        if completion is not None and (entry := self.caching.keep(plan, completion, report)):
            # Redis after the answer is sent, off the client's clock
            response.background = BackgroundTask(self.caching.persist, plan, entry)
        return response

    async def _store_stream(
        self, ctx: RequestContext, shaper: StreamShaper, plan: CachePlan
    ) -> None:
        """After a stream: store its answer in the cache if it completed."""
        report = ctx.report
        if shaper.builder is None or report is None or report.status != 200:
            return
        completion = shaper.builder.build()
        if completion is not None:
            completion["model"] = ctx.decision.model
            await self.caching.store(plan, completion, report)

    def _stream_end(
        self, ctx: RequestContext, reply: UpstreamReply, shaper: StreamShaper
    ) -> StreamEnd:
        def on_end(failure: str | None) -> dict[str, Any] | None:
            ctx.first_token_at = shaper.first_token_at
            report = ctx.report = self.meter.finish(
                ctx,
                replica=reply.replica,
                usage=shaper.usage.latest,
                status=200 if failure is None else 499 if failure == "client_disconnected" else 502,
                finish_reasons=shaper.finish_reasons,
                response_id=shaper.response_id,
                error_type=failure and failure.split(" (")[0],
            )
            remaining = self.budgets.spend(report)
            figures = self.meter.stream_object(report)
            if remaining and figures is not None:
                figures["budget_remaining_usd"] = next(iter(remaining.values()))
            return figures

        return on_end

    def _force(self, model: str, tier: str, principal: Principal) -> Decision:
        """``x-tollway-tier``: the key must be allowed to pick its tier."""
        if not principal.force_tier:
            raise PermissionDenied("This API key may not choose its tier with x-tollway-tier.")
        if tier not in self.pools.tiers:
            raise InvalidRequest(
                f"x-tollway-tier names no tier: {tier!r} (tiers: {', '.join(self.pools.tiers)})."
            )
        try:
            return self.routes.force(model, tier)
        except UnknownModel:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
            ) from None

    def _route(self, model: str, body: dict[str, Any], tenant: str) -> tuple[Decision, float]:
        """The decision, and how far budget-aware routing moved the cut points."""
        base = self.routes.cut_points
        cuts, shift = (None, 0.0) if base is None else self.burn.cut_points(tenant, base)
        try:
            decision = self.routes.resolve(model, body, cuts)
        except UnknownModel:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
            ) from None
        if decision.routed and self.count_route is not None:
            self.count_route(decision.tier, decision.score)
        return decision, shift

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequest("The Content-Length header is not a number.")
            if int(declared) > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)


async def _then(
    events: AsyncGenerator[bytes, None], after: Callable[[], Awaitable[None]]
) -> AsyncGenerator[bytes, None]:
    """Relay ``events``, then run ``after()`` however the stream ended."""
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()
        await after()


def _chain(first: BackgroundTask | None, then: Callable[[], Awaitable[None]]) -> BackgroundTask:
    async def run() -> None:
        try:
            if first is not None:
                await first()
        finally:
            await then()

    return BackgroundTask(run)


async def _replay_events(events: list[bytes]) -> AsyncGenerator[bytes, None]:
    for event in events:
        yield event


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("The upstream answered 200 with a body that is not JSON.") from None
    if not isinstance(parsed, dict):
        raise UpstreamError("The upstream answered 200 with a body that is not a JSON object.")
    return parsed


def _finish_reasons(completion: dict[str, Any]) -> list[str]:
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return []
    return [
        str(c["finish_reason"]) for c in choices if isinstance(c, dict) and c.get("finish_reason")
    ]


def _parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}.", code="invalid_json"
        ) from None


def _report_headers(decision: Decision) -> dict[str, str]:
    headers = {"x-tollway-tier": decision.tier, "x-tollway-model": decision.model}
    if decision.routed:
        headers["x-tollway-route-reason"] = decision.reason
        if decision.score is not None:
            headers["x-tollway-route-score"] = f"{decision.score:.4f}"
    return headers
