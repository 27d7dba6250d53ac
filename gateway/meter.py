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

from starlette.types import Receive

from gateway.admission import Ticket
from gateway.config import Settings
from gateway.pool import ReplicaState
from gateway.recorder import Recorder
from gateway.schemas import Endpoint
from gateway.upstream import GpuBill
from metering.money import ratio, to_nanos
from metering.pricing import NO_COST, GpuTariff, TokenPrices, price_tokens
from metering.report import FREE, RequestReport, report_of, to_micros
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
            tariff = self._tariffs.get(replica)
            if tariff is None:
                meter = replica.meter
                tariff = GpuTariff(meter.hourly, self.overhead, meter.idle_per_busy)
                self._tariffs[replica] = tariff
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

    @staticmethod
    def _call(sink: ReportSink, report: RequestReport, ctx: RequestContext) -> None:
        try:
            sink(report, ctx)
        except Exception:  # a metering sink must never fail a request
            log.exception("metering sink %r failed", sink)
