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
from metering.native import relay as native_relay
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
from metering.usage import MODEL_KEYS, NO_USAGE, TokenUsage, usage_in
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
        self, ctx: RequestContext, replica: ReplicaState, data: bytes, *, report: bool = False
    ) -> tuple[RequestReport | None, bytes] | None:
        """``finish`` for an answer ``replica`` sent with status 200 and the caller relays
        unread, and the report's ``head_lines``, as one step: its usage read out of
        ``data`` (``usage_in``, which also checks the answer names the model asked for).

        None, having done nothing, when the answer must be read whole (``usage_in``
        found no plain usage, or another model's name), for an answer the cache
        served and for a tier priced by tokens (``finish`` then).

        Most requests end here. The plain answer is metered by one C call
        (``metering.native``); anything else, or a package built without the
        extension, by ``relay_reference``, which decides. Either way the report is
        the one ``finish`` would make (with no finish reasons or response id: only a
        span reads those); tests/gateway/test_meter_relay.py and
        tests/metering/test_relay_native.py hold them equal.

        The report is returned when ``report`` asks for it (the caller reads it:
        budgets) or a sink reads it at once; otherwise (None in its place) it is
        kept compact in the recorder's log and made only for the batch.
        """
        decision = ctx.decision
        if ctx.cache in FREE or decision.tier in self.token_prices:
            return None
        tariff = self._tariffs.get(replica) or self._new_tariff(replica)
        now = time.monotonic()
        recorder = self.recorder
        span = ctx.span
        wanted = report or self.sinks or (span is not None and span.traced)
        relayed: Any = NotImplemented
        if native_relay is not None:
            log = None if wanted or recorder is None else recorder.log
            relayed = native_relay(
                data, MODEL_KEYS[decision.model], ctx, decision, replica.url,
                _OPERATION[ctx.endpoint], *tariff.rates_at(now), now, log,
            )  # fmt: skip
        if relayed is NotImplemented:
            relayed = self.relay_reference(ctx, replica, data, tariff, now)
        if relayed is None:
            return None
        made: RequestReport | None = relayed[0]
        if made is None:  # in the recorder's log
            return relayed  # type: ignore[no-any-return]
        if span is not None and span.traced and self.on_span is not None:
            self._call(self.on_span, made, ctx)
        for sink in self.sinks:
            self._call(sink, made, ctx)
        if recorder is not None:
            recorder.add(made)
        return relayed  # type: ignore[no-any-return]

    def relay_reference(
        self,
        ctx: RequestContext,
        replica: ReplicaState,
        data: bytes,
        tariff: GpuTariff,
        now: float,
    ) -> tuple[RequestReport, bytes] | None:
        """``relay``'s report and head lines in Python, not yet handed to any sink: what the
        C step computes for the plain answer, and the step itself for any other."""
        decision = ctx.decision
        usage = usage_in(data, decision.model)
        if usage is None:
            return None
        bill = ctx.bill
        gpu_us = to_micros(bill.gpu_seconds)
        cost = tariff.price_at(gpu_us, now)
        first = ctx.first_token_at
        request_id = ctx.request_id
        report = report_of((
            request_id, ctx.tenant, decision.tier, decision.model, _OPERATION[ctx.endpoint],
            usage, gpu_us, cost, ctx.cache, 0, replica.url, bill.attempts, 200,
            time.time_ns() // 1000, now - ctx.started,
            None if first is None else first - ctx.started, (), None, None,
        ))  # fmt: skip
        marginal, loaded = cost
        if marginal < 0 or loaded < 0:
            return report, report.head_lines()  # spelled with their signs
        # ``head_lines``, inline: without the extension this runs for every answer
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
