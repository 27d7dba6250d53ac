"""The gateway's side of metering: turn a finished request into its report and record it.

``metering/`` holds the ideas (occupancy, prices, the report); this module
collects what one request did (``RequestContext``: who, which tier, the GPU
bill of its attempts) and prices it. The sinks that must see the report at
once are called with it (the request's span; the burn rate budget-aware
routing reads); Prometheus and the usage ledger get it a moment later, a
batch at a time, through the ``Recorder``. A sink that fails is logged; it
never fails the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from starlette.types import Receive

from gateway.admission import Ticket
from gateway.config import Settings
from gateway.pool import ReplicaState
from gateway.recorder import Recorder
from gateway.schemas import Endpoint
from gateway.upstream import GpuBill
from metering.money import NANOS_PER_USD, ratio, to_nanos
from metering.pricing import NO_COST, GpuTariff, TokenPrices, price_tokens
from metering.report import (
    CACHED_LINE,
    FIGURE_LINES,
    FREE,
    MICROS,
    RequestReport,
    report_of,
    to_micros,
)
from metering.telemetry import Content, RequestSpan
from metering.usage import NO_USAGE, TokenUsage
from router.table import Decision

log = logging.getLogger("tollway.meter")


@dataclass(eq=False, slots=True)
class RequestContext:
    request_id: str
    tenant: str
    endpoint: Endpoint
    decision: Decision
    started: float = field(default_factory=time.monotonic)
    bill: GpuBill = field(default_factory=GpuBill)
    first_token_at: float | None = None
    span: RequestSpan | None = None
    content: Content | None = None  # only when spans record content (opt-in)
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (budget)
    cache: str = "miss"  # miss | bypass | hit | coalesced | replay
    report: RequestReport | None = None  # a stream's, once it ended
    receive: Receive | None = None  # the ASGI channel, to notice a client that left
    ticket: Ticket | None = None  # admission: tenant, priority, deadline


ReportSink = Callable[[RequestReport, RequestContext], None]

_OPERATION = {endpoint: endpoint.operation for endpoint in Endpoint}  # a dict, not a property


class Meter:
    def __init__(
        self,
        settings: Settings,
        sinks: Sequence[ReportSink] = (),
        recorder: Recorder | None = None,
        on_span: ReportSink | None = None,
    ):
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
        self.sinks = list(sinks) if self.enabled else []  # called at once (the burn rate)
        self.on_span = on_span if self.enabled else None  # only for a request with a span
        self.recorder = recorder if self.enabled else None  # counts it later, in a batch
        self._tariffs: dict[ReplicaState, GpuTariff] = {}  # by replica (hashed by identity)

    def finish(
        self,
        ctx: RequestContext,
        replica: ReplicaState | None,
        usage: TokenUsage | None,
        status: int,
        finish_reasons: Sequence[str] = (),
        response_id: str | None = None,
        error_type: str | None = None,
        saved: Decimal | None = None,
    ) -> RequestReport:
        """Price what ``ctx`` used and record it. Called once per request that was served.

        Answers from the cache, a coalesced flight or an idempotent replay cost
        nothing (``saved`` says what they would have cost); retries and
        attempts that failed are in ``ctx.bill``.
        """
        if usage is None:
            usage = NO_USAGE
        now = time.monotonic()
        decision = ctx.decision
        tier = decision.tier
        bill = ctx.bill
        gpu_us = to_micros(bill.gpu_seconds)  # what the header prints, and what is priced
        cache = ctx.cache
        if cache in FREE:
            cost = NO_COST
        elif (prices := self.token_prices.get(tier)) is not None:
            cost = price_tokens(usage.prompt_tokens, usage.completion_tokens, prices, self.overhead)
        elif replica is None:
            cost = NO_COST  # nothing ran: no replica was reached
        else:
            tariff = self._tariffs.get(replica) or self._new_tariff(replica)
            cost = tariff.price_at(gpu_us, now)
        first = ctx.first_token_at
        report = report_of((
            ctx.request_id,
            ctx.tenant,
            tier,
            decision.model,
            _OPERATION[ctx.endpoint],
            usage,
            gpu_us,
            cost,
            cache,
            0 if saved is None else to_nanos(saved),
            replica.url if replica else "",
            bill.attempts,
            status,
            time.time_ns() // 1000,
            now - ctx.started,
            None if first is None else first - ctx.started,
            tuple(finish_reasons) if finish_reasons else (),
            response_id,
            error_type,
        ))  # fmt: skip
        span = ctx.span
        if span is not None and span.traced and self.on_span is not None:
            self._call(self.on_span, report, ctx)  # a sampled request's span
        for sink in self.sinks:
            self._call(sink, report, ctx)
        if self.recorder is not None:
            self.recorder.add(report)
        return report

    def relay(
        self, ctx: RequestContext, replica: ReplicaState, usage: TokenUsage
    ) -> tuple[RequestReport, bytes] | None:
        """``finish`` for an answer served by ``replica`` with status 200, and the report's
        ``head_lines``, as one step; None, having done nothing, for an answer the cache
        served or a tier priced by tokens (``finish`` then).

        Most requests end here: an untraced answer relayed as vLLM sent it. Priced,
        reported and queued for counting exactly as ``finish`` does it (with no
        finish reasons or response id: only a span reads those), with its figures'
        head lines formatted here: one call where ``finish``, ``to_micros`` and
        ``head_lines`` were three, about a point of the metered gateway's CPU
        (bench/RESULTS.md, 2026-11-23, session 9).
        tests/gateway/test_meter_relay.py holds it equal to ``finish`` followed by
        ``head_lines``.
        """
        decision = ctx.decision
        tier = decision.tier
        cache = ctx.cache
        if cache in FREE or tier in self.token_prices:
            return None
        now = time.monotonic()
        bill = ctx.bill
        try:  # ``to_micros``, without the call
            gpu_us = round(bill.gpu_seconds * MICROS)
        except (ValueError, OverflowError):  # NaN, inf: a bug upstream must not fail a request
            gpu_us = 0
        tariff = self._tariffs.get(replica) or self._new_tariff(replica)
        cost = tariff.price_at(gpu_us, now)
        first = ctx.first_token_at
        request_id = ctx.request_id
        report = report_of((
            request_id, ctx.tenant, tier, decision.model, _OPERATION[ctx.endpoint], usage,
            gpu_us, cost, cache, 0, replica.url, bill.attempts, 200, time.time_ns() // 1000,
            now - ctx.started, None if first is None else first - ctx.started, (), None, None,
        ))  # fmt: skip
        span = ctx.span
        if span is not None and span.traced and self.on_span is not None:
            self._call(self.on_span, report, ctx)
        for sink in self.sinks:
            self._call(sink, report, ctx)
        if self.recorder is not None:
            self.recorder.add(report)
        marginal, loaded = cost
        if marginal < 0 or loaded < 0:
            return report, report.head_lines()  # spelled with their signs
        lines = FIGURE_LINES % (
            request_id.encode("latin-1"), usage[0], usage[1], *divmod(gpu_us, MICROS),
            *divmod(marginal, NANOS_PER_USD), *divmod(loaded, NANOS_PER_USD),
        )  # fmt: skip
        if usage[2]:
            lines += CACHED_LINE % usage[2]
        return report, lines

    def headers(self, report: RequestReport) -> dict[str, str]:
        """The report's ``x-tollway-*`` headers for its answer; none with metering off."""
        return report.headers() if self.enabled else {}

    def stream_object(self, report: RequestReport) -> dict[str, Any] | None:
        """The stream's final ``tollway`` object; None (no object) with metering off."""
        return report.stream_object() if self.enabled else None

    def _new_tariff(self, replica: ReplicaState) -> GpuTariff:
        """The replica's tariff, made on its first priced request (a call only then)."""
        meter = replica.meter
        tariff = self._tariffs[replica] = GpuTariff(
            meter.hourly, self.overhead, meter.idle_per_busy
        )
        return tariff

    @staticmethod
    def _call(sink: ReportSink, report: RequestReport, ctx: RequestContext) -> None:
        try:
            sink(report, ctx)
        except Exception:  # a metering sink must never fail a request
            log.exception("metering sink %r failed", sink)
