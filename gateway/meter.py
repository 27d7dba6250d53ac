"""The gateway's side of metering: a request's context priced into its report.

``metering/`` holds the ideas (occupancy, prices, the report); this module
reads what one request did (``RequestContext``: who, which tier, the GPU
bill of its attempts, the usage its answer carried) and prices it, once:
``report`` makes the report the first time it is asked and hands back the
same one after, so the figures in the response's headers, in a stream's
final event and in the settlement (``gateway.settle``) are one report.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from gateway.config import Settings
from gateway.context import RequestContext
from gateway.pool import ReplicaState
from metering.money import ratio
from metering.pricing import NO_COST, Cost, GpuTariff, TokenPrices, price_tokens
from metering.report import FREE, RequestReport, to_micros
from metering.usage import NO_USAGE

NOT_ROUTED = "none"  # tier and model of a request settled before it was routed


class Meter:
    def __init__(self, settings: Settings):
        self.enabled = settings.metering.enabled
        self.overhead = ratio(Decimal(str(settings.metering.overhead_factor)))
        self.token_prices = {
            tier.name: TokenPrices(
                Decimal(str(tier.prices.input_usd_per_mtok)),
                Decimal(str(tier.prices.output_usd_per_mtok)),
            )
            for tier in settings.tiers
            if tier.prices is not None
        }
        self._tariffs: dict[ReplicaState, GpuTariff] = {}  # by replica (hashed by identity)

    def report(self, ctx: RequestContext) -> RequestReport:
        """The request's report, priced the first time it is asked for (then kept on ``ctx``).

        Answers from the cache, a coalesced flight or an idempotent replay cost
        nothing (``ctx.saved_nanos`` says what they would have cost); retries
        and attempts that failed are in ``ctx.bill``, priced at the last
        attempt's replica.
        """
        if ctx.report is not None:
            return ctx.report
        now = time.monotonic()
        usage = ctx.usage or NO_USAGE
        bill = ctx.bill
        gpu_us = to_micros(bill.gpu_seconds)  # what the header prints, and what is priced
        decision = ctx.decision
        tier = decision.tier if decision else NOT_ROUTED
        error = ctx.error
        first = ctx.first_token_at
        ctx.report = RequestReport(
            request_id=ctx.request_id,
            tenant=ctx.tenant or NOT_ROUTED,
            tier=tier,
            model=decision.model if decision else NOT_ROUTED,
            operation=ctx.endpoint.operation,
            usage=usage,
            gpu_us=gpu_us,
            cost=self._price(ctx, tier, gpu_us, now),
            cache=ctx.cache,
            saved_nanos=ctx.saved_nanos if ctx.cache in FREE else 0,
            replica=bill.replica.url if bill.replica else "",
            attempts=bill.attempts,
            status=499 if ctx.status is None else ctx.status,
            finished_us=time.time_ns() // 1000,
            duration_s=now - ctx.started,
            ttft_s=None if first is None else first - ctx.started,
            finish_reasons=tuple(ctx.finish_reasons),
            response_id=ctx.response_id,
            error_type=None if error is None else error.error_type,
            key_id=ctx.key_id,
            route_score=decision.score if decision else None,
            fallback_from=ctx.fallback_from,
            hold_id=ctx.hold_id,
        )
        return ctx.report

    def _price(self, ctx: RequestContext, tier: str, gpu_us: int, now: float) -> Cost:
        if ctx.cache in FREE:
            return NO_COST
        prices = self.token_prices.get(tier)
        if prices is not None:
            usage = ctx.usage or NO_USAGE
            return price_tokens(usage.prompt_tokens, usage.completion_tokens, prices, self.overhead)
        replica = ctx.bill.replica
        if replica is None:
            return NO_COST  # nothing ran: no replica was reached
        return self._tariff(replica).price_at(gpu_us, now)

    def _tariff(self, replica: ReplicaState) -> GpuTariff:
        tariff = self._tariffs.get(replica)
        if tariff is None:
            meter = replica.meter
            tariff = self._tariffs[replica] = GpuTariff(
                meter.hourly, self.overhead, meter.idle_per_busy
            )
        return tariff

    def dearest(self, replicas: Iterable[ReplicaState], gpu_us: int) -> int:
        """``gpu_us`` priced now (loaded nano-dollars) at the dearest of ``replicas``: what
        a request about to run there will cost at most, for its budget reservation."""
        now = time.monotonic()
        return max((self._tariff(r).price_at(gpu_us, now).loaded_nanos for r in replicas),
                   default=0)  # fmt: skip

    def headers(self, report: RequestReport) -> dict[str, str]:
        """The report's ``x-tollway-*`` headers for its answer; none with metering off."""
        return report.headers() if self.enabled else {}

    def stream_object(self, report: RequestReport) -> dict[str, Any] | None:
        """The stream's final ``tollway`` object; None (no object) with metering off."""
        return report.stream_object() if self.enabled else None
