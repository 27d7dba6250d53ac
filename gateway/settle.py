"""The settlement: the one place a request's outcome is recorded, exactly once.

``Pipeline.run`` calls ``settle`` from the ``finally`` around everything a
request does, from reading its head to its last byte, whatever happened:
answered, replayed, a cache hit, coalesced, refused after its span started
(409, 422, 429), an upstream error, a fallback, a client that left at any
stage. A request that was routed is priced
(``Meter.report``, the same report its headers or final stream event showed,
if any) and that report is recorded everywhere it goes:

- the span: its attributes and status (``error.type`` from the error value),
  then its end;
- the sinks that read each report at once (the burn rate budget-aware routing
  watches);
- the recorder, which hands it to Prometheus, the spend counters (which
  also let go of its budget and rate-limit hold) and the ledger a batch at a
  time.

A request refused before it was routed (a bad key, a body that does not
parse, an unknown model) did no work and has no report: it is only counted in
``tollway_requests_total`` (and its span, if routing had begun, ends failed). A sink that
fails is logged; it never fails the request or the other sinks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gateway.context import RequestContext
from gateway.meter import Meter
from gateway.recorder import Recorder
from metering.report import RequestReport
from metering.telemetry import server_of

log = logging.getLogger("tollway.settle")

ReportSink = Callable[[RequestReport], None]


class Settlement:
    def __init__(
        self,
        meter: Meter,
        recorder: Recorder | None,
        count_refused: Callable[[RequestReport], None],
        sinks: Sequence[ReportSink] = (),
    ):
        self.meter = meter
        self.sinks = list(sinks) if meter.enabled else []
        self.recorder = recorder if meter.enabled else None
        self.count_refused = count_refused

    def settle(self, ctx: RequestContext) -> RequestReport | None:
        """Record ``ctx``'s outcome; its report, or None for a request refused before any
        work. A second call for the same request is a bug: logged, and ignored."""
        if ctx.settled:
            log.error("request %s was settled twice; the second is ignored", ctx.request_id)
            return None
        ctx.settled = True
        if not ctx.started_work:
            refusal = self.meter.report(ctx)  # unrouted: tier and model "none", no cost
            if ctx.span is not None:  # refused while routing: the span ends, failed
                ctx.span.fail(refusal.error_type or str(refusal.status))
            self._call(self.count_refused, refusal)
            return None
        report = self.meter.report(ctx)
        self._end_span(ctx, report)
        for sink in self.sinks:
            self._call(sink, report)
        if self.recorder is not None:
            self.recorder.add(report)
        return report

    @staticmethod
    def _end_span(ctx: RequestContext, report: RequestReport) -> None:
        span = ctx.span
        if span is None or not span.open:
            return
        address, port, _ = server_of(report.replica) if report.replica else (None, None, 0)
        span.finish(
            report,
            server_address=address,
            server_port=port,
            response_model=report.model,
            content=ctx.content,
        )

    @staticmethod
    def _call(sink: Callable[[RequestReport], object], report: RequestReport) -> None:
        try:
            sink(report)
        except Exception:  # recording must never fail a request, nor skip the other sinks
            log.exception("settling request %s in %r failed", report.request_id, sink)
