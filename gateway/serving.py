"""Serving a prepared request: a replay, a cache hit, a coalesced answer, or the upstream's.

``serve`` tries, in order: an idempotent replay (``gateway.idempotent``), the
response cache, an identical request already in flight (its answer, once
stored), and otherwise admission to a replica slot and the upstream call,
answered whole (``serve_full``) or as a stream (``serve_stream``). Each
branch records what it did on the request's ``RequestContext``; pricing is
``Meter.report`` (once), and recording it is the settlement's
(``gateway.settle``), never this module's.

Work that must wait until the answer is sent (writing it to the cache,
letting coalesced followers look) goes on ``ctx.after``; the pipeline runs it
after the response, before the settlement.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import AsyncGenerator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from cache.idempotency import StoredResponse
from cache.response_cache import CachedResponse
from gateway.admission import Scheduler, Slot
from gateway.budgets import BudgetGuard
from gateway.caching import CacheLayer
from gateway.context import RequestContext
from gateway.disconnect import cancel_on_disconnect
from gateway.errors import JSON, GatewayError, NoHealthyUpstream, UpstreamError
from gateway.idempotent import IdempotencyLayer, replayed_events
from gateway.meter import Meter
from gateway.pool import Pools, TierPool
from gateway.sse import DONE, chunks_from_completion
from gateway.stream_shaper import StreamShaper
from gateway.streaming import EventStreamResponse, relay_events
from gateway.upstream import UpstreamClient, UpstreamReply
from gateway.upstream_errors import refusal
from metering.money import to_nanos
from metering.report import HEADER_PREFIX
from metering.telemetry import INERT, Content
from metering.usage import TokenUsage
from router.table import Decision

if TYPE_CHECKING:
    from gateway.pipeline import Prepared


class Serving:
    def __init__(
        self,
        *,
        pools: Pools,
        scheduler: Scheduler,
        upstream: UpstreamClient,
        meter: Meter,
        budgets: BudgetGuard,
        caching: CacheLayer,
        idempotency: IdempotencyLayer | None,
    ):
        self.scheduler = scheduler
        self.upstream = upstream
        self.meter = meter
        self.budgets = budgets
        self.caching = caching
        self.idempotency = idempotency
        # Each tier's admission candidates: itself, then its fallbacks in order.
        self.candidates = {
            pool.name: [pool, *(pools.tiers[name] for name in pool.tier.fallback)] for pool in pools
        }

    async def serve(self, ctx: RequestContext, prepared: Prepared) -> Response:
        key = prepared.idempotency_key
        if key is None or self.idempotency is None:
            return await self._serve_once(ctx, prepared)
        return await self.idempotency.run(
            ctx,
            key,
            prepared.idempotency_print,
            serve=functools.partial(self._serve_once, ctx, prepared),
            replay=functools.partial(self._replay_stored, ctx, prepared.shaper),
        )

    def headers(self, ctx: RequestContext) -> dict[str, str]:
        """The answer's headers: where it ran, its figures (pricing it), the budget left."""
        headers = _where(ctx)
        report = self.meter.report(ctx)
        headers.update(self.meter.headers(report))
        headers.update(self.budgets.headers_for(ctx, report))
        return headers

    async def _serve_once(self, ctx: RequestContext, prepared: Prepared) -> Response:
        """The cache, then identical requests in flight, then (on a miss) the upstream."""
        plan = prepared.plan
        assert ctx.decision is not None
        hit = None
        if plan.decision.lookup:
            with ctx.span.child("tollway.cache_lookup") if ctx.span else INERT as step:
                hit = await self.caching.lookup(plan)
                step.set_attribute("tollway.cache", "hit" if hit else "miss")
            self.caching.on_event(ctx.decision.tier, "hit" if hit else "miss")
        else:
            self.caching.on_event(ctx.decision.tier, "bypass")
        if hit is not None:
            return self._replay(ctx, hit, prepared.shaper, "hit")
        # From here on the request may wait for, or run, GPU work: stop it if the
        # client leaves (a cache lookup is bounded by its Redis budget).
        return await cancel_on_disconnect(self._join_or_forward(ctx, prepared), ctx.receive)

    async def _join_or_forward(self, ctx: RequestContext, prepared: Prepared) -> Response:
        """Join an identical request in flight, or go upstream (and let followers in after)."""
        plan = prepared.plan
        flight = await self.caching.join_flight(plan)
        if isinstance(flight, CachedResponse):
            assert ctx.decision is not None
            self.caching.on_event(ctx.decision.tier, "coalesced")
            return self._replay(ctx, flight, prepared.shaper, "coalesced")
        if flight is not None:  # the leader: followers look once its answer is stored
            ctx.after.append(functools.partial(self.caching.end_flight, plan, flight))
        if prepared.shaper is None:
            return await self.serve_full(ctx, prepared)
        return await self.serve_stream(ctx, prepared, prepared.shaper)

    async def serve_full(self, ctx: RequestContext, prepared: Prepared) -> Response:
        """The upstream's whole answer: parsed once for its usage, relayed as it came
        unless its ``model`` must be renamed."""
        reply = await self._send(ctx, prepared.body, stream=False)
        data = await reply.read()
        if reply.status != 200:
            raise refusal(reply.status, data, reply.replica.url)
        completion = _json_object(data)
        decision = ctx.decision
        assert decision is not None
        ctx.usage = TokenUsage.from_openai(completion.get("usage"))
        ctx.finish_reasons = _finish_reasons(completion)
        ctx.response_id = completion.get("id")
        if ctx.content is not None:
            ctx.content = Content(ctx.content.input, completion.get("choices") or ())
        if completion.get("model") != decision.model:
            # vLLM names its first --served-model-name whatever alias was asked for.
            completion["model"] = decision.model
            data = orjson.dumps(completion)
        ctx.answered(200)
        headers = self.headers(ctx)
        entry = self.caching.keep(prepared.plan, completion, self.meter.report(ctx))
        if entry is not None:  # Redis after the answer is sent, off the client's clock
            ctx.after.append(functools.partial(self.caching.persist, prepared.plan, entry))
        return Response(data, 200, headers, media_type=JSON)

    async def serve_stream(
        self, ctx: RequestContext, prepared: Prepared, shaper: StreamShaper
    ) -> Response:
        """The upstream's stream, relayed event by event; its figures ride on the last one."""
        reply = await self._send(ctx, prepared.body, stream=True)
        if reply.status != 200:
            raise refusal(reply.status, await reply.read(), reply.replica.url)

        async def release() -> None:  # a stream the client never started reading
            reply.release(abort=True)

        ctx.after.append(release)
        if shaper.builder is not None:
            ctx.after.append(functools.partial(self._store_stream, ctx, shaper, prepared))
        ctx.answered(200)
        end = functools.partial(self._end_stream, ctx, reply, shaper)
        return EventStreamResponse(relay_events(reply, shaper, end), _where(ctx))

    def _end_stream(
        self,
        ctx: RequestContext,
        reply: UpstreamReply,
        shaper: StreamShaper,
        error: GatewayError | None,
    ) -> dict[str, Any] | None:
        """A stream ended (its slot released): its outcome, priced; the final event's figures."""
        ctx.first_token_at = shaper.first_token_at
        ctx.usage = shaper.usage.latest
        ctx.finish_reasons = shaper.finish_reasons
        ctx.response_id = shaper.response_id
        if error is not None:
            ctx.failed(error)
        report = self.meter.report(ctx)
        figures = self.meter.stream_object(report)
        remaining = self.budgets.headers_for(ctx, report)
        if remaining and figures is not None:
            figures["budget_remaining_usd"] = next(iter(remaining.values()))
        return figures

    async def _store_stream(
        self, ctx: RequestContext, shaper: StreamShaper, prepared: Prepared
    ) -> None:
        """After a stream: store its answer in the cache if it completed."""
        report = ctx.report
        if shaper.builder is None or report is None or report.status != 200:
            return
        completion = shaper.builder.build()
        if completion is not None and ctx.decision is not None:
            completion["model"] = ctx.decision.model
            await self.caching.store(prepared.plan, completion, report)

    def _replay(
        self, ctx: RequestContext, hit: CachedResponse, shaper: StreamShaper | None, status: str
    ) -> Response:
        """Answer from a stored completion, as JSON or as a stream, at zero cost."""
        assert ctx.decision is not None
        ctx.cache = status
        completion = {**hit.completion, "model": ctx.decision.model}
        ctx.usage = TokenUsage(hit.prompt_tokens, hit.completion_tokens)
        ctx.saved_nanos = to_nanos(hit.cost_usd)
        ctx.finish_reasons = _finish_reasons(completion)
        ctx.response_id = completion.get("id")
        ctx.answered(200)
        headers = self.headers(ctx)
        if status == "hit":
            headers["age"] = str(hit.age_s(time.time()))
        if shaper is None:
            return Response(orjson.dumps(completion), 200, headers, media_type=JSON)
        events: list[bytes] = []
        for event in chunks_from_completion(completion, include_usage=True)[:-1]:
            events += shaper.feed(event)
        events += shaper.finish(self.meter.stream_object(self.meter.report(ctx)))
        events.append(DONE)
        return EventStreamResponse(_events(events), headers)

    def _replay_stored(
        self, ctx: RequestContext, shaper: StreamShaper | None, stored: StoredResponse
    ) -> Response:
        """An idempotent retry: the first answer again, at zero cost."""
        ctx.cache = "replay"
        kept = stored.headers
        ctx.saved_nanos = to_nanos(Decimal(kept.get(HEADER_PREFIX + "cost-usd", "0")))
        ctx.usage = TokenUsage(
            int(kept.get(HEADER_PREFIX + "prompt-tokens", 0)),
            int(kept.get(HEADER_PREFIX + "completion-tokens", 0)),
        )
        ctx.answered(stored.status)
        headers = self.headers(ctx)
        headers["idempotent-replayed"] = "true"
        if stored.events is None:
            return Response(
                stored.body or b"", stored.status, headers, media_type=kept.get("content-type")
            )
        figures = self.meter.stream_object(self.meter.report(ctx))
        return EventStreamResponse(replayed_events(stored.events, figures), headers)

    async def _admit(
        self, ctx: RequestContext, body: bytes, routed: Decision, fallen: bool = False
    ) -> tuple[Slot, bytes]:
        """A slot for the request: on its tier, or on a fallback tier (then re-addressed).

        ``fallen``: the routed tier lost its last replica under the request; only
        its fallbacks are candidates now.
        """
        assert ctx.ticket is not None
        candidates = self._candidates(ctx, routed.tier)
        slot = await self.scheduler.acquire(
            candidates[1:] if fallen else candidates,
            ctx.ticket,
            ctx.span,
            fallen_from=routed.tier if fallen else None,
        )
        if slot.fallback is None:
            return slot, body
        tier = slot.pool.tier
        ctx.decision = dataclasses.replace(
            routed, tier=tier.name, model=tier.models[0], reason=f"fallback: {slot.fallback}"
        )
        ctx.fallback_from = routed.tier
        ctx.headers["x-tollway-fallback-from"] = routed.tier
        ctx.headers["x-tollway-fallback-reason"] = slot.fallback
        if ctx.span is not None:
            ctx.span.set_route(tier.name, routed.score, routed.reason)
            ctx.span.annotate(
                {"tollway.fallback.from": routed.tier, "tollway.fallback.reason": slot.fallback}
            )
        readdressed = orjson.loads(body)
        readdressed["model"] = tier.models[0]
        return slot, orjson.dumps(readdressed)

    def _candidates(self, ctx: RequestContext, tier: str) -> list[TierPool]:
        """The tier, then those of its fallbacks the request's key may be served by."""
        allowed = ctx.allowed_tiers
        candidates = self.candidates[tier]
        return candidates if allowed is None else [p for p in candidates if p.name in allowed]

    async def _send(self, ctx: RequestContext, body: bytes, stream: bool) -> UpstreamReply:
        """Admission, then the upstream call; falls back once more if the tier dies under it."""
        routed = ctx.decision
        assert routed is not None
        await self.budgets.reserve(ctx, routed.tier, body)  # 429 when a budget lacks room
        slot, sent = await self._admit(ctx, body, routed)
        try:
            return await self._post(ctx, slot, sent, stream)
        except NoHealthyUpstream:
            if slot.fallback is not None or len(self._candidates(ctx, routed.tier)) == 1:
                raise
            # Its attempts ejected the tier's last replica: the fallbacks may still serve it.
            slot, sent = await self._admit(ctx, body, routed, fallen=True)
            return await self._post(ctx, slot, sent, stream)

    async def _post(
        self, ctx: RequestContext, slot: Slot, body: bytes, stream: bool
    ) -> UpstreamReply:
        assert ctx.ticket is not None
        return await self.upstream.send(
            slot,
            ctx.ticket,
            ctx.endpoint.path,
            body,
            {"content-type": JSON, "x-request-id": ctx.request_id},
            stream=stream,
            bill=ctx.bill,
            trace=ctx.span,
        )


async def _events(events: list[bytes]) -> AsyncGenerator[bytes, None]:
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


def _where(ctx: RequestContext) -> dict[str, str]:
    """Where the answer came from: tier, model, route, the request's extra headers, cache."""
    decision = ctx.decision
    assert decision is not None
    headers = {"x-tollway-tier": decision.tier, "x-tollway-model": decision.model}
    if decision.routed:
        headers["x-tollway-route-reason"] = decision.reason
        if decision.score is not None:
            headers["x-tollway-route-score"] = f"{decision.score:.4f}"
    return {**headers, **ctx.headers, "x-tollway-cache": ctx.cache}
