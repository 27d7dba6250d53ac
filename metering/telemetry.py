"""OpenTelemetry spans for each request: the spans, failure handling and ``from_env``.

The report (``metering.report``) stays plain data and ``metering.genai`` maps it
to GenAI-convention attributes; this module puts them on spans. One request,
joined to the client's trace when it sent a ``traceparent``::

    chat auto                CLIENT    gen_ai.* request, usage, cost; tollway.* figures
    +- tollway.route         INTERNAL
    +- tollway.cache_lookup  INTERNAL
    +- tollway.queue_wait    INTERNAL
    +- POST                  CLIENT    one per upstream attempt; its traceparent goes to vLLM

- Kind CLIENT: the operation calls a model in another process. Each HTTP
  attempt is a child, as HTTP instrumentation under a GenAI span would be.
- A request whose attributes carry ``error.type`` (see ``metering.genai``) gets
  status ERROR.
- Content only with ``record_content``; string lengths are capped by
  ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``.
- Spans are never made "current": a stream can end in another task than it
  began in, where detaching a context fails. Parents are passed explicitly.

Nothing here may fail a request: each call catches its own errors, counts them
through ``on_failure(where)`` and logs at most once a minute. With tracing off
every call returns at once; a root the sampler drops is decided before any
SDK object exists and only propagates its ``traceparent`` (``metering.sampling``).
Which exporters and sampler ``from_env`` builds is ``metering.span_export``'s.

The mapping names (``Content``, ``request_attributes``, ``report_attributes``,
``error_type``, ``content_attributes``, ``PROVIDER``) live in ``metering.genai``
and are re-exported here.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from metering.genai import PROVIDER as PROVIDER
from metering.genai import Content as Content
from metering.genai import content_attributes as content_attributes
from metering.genai import error_type as error_type
from metering.genai import report_attributes as report_attributes
from metering.genai import request_attributes as request_attributes
from metering.lite_span import LiteSpan, LiteTracer
from metering.report import RequestReport
from metering.sampling import RootSampler, Unsampled
from metering.span_export import build_provider

log = logging.getLogger("tollway.telemetry")

TRACER_NAME = "tollway.metering.telemetry"
FailureHook = Callable[[str], None]

_W3C = TraceContextTextMapPropagator()
_TRACEPARENT = "traceparent"
_RAW_TRACEPARENT = b"traceparent"
_NAME = itemgetter(0)
_LOG_EVERY_S = 60.0


ParentHeaders = Mapping[str, str] | Sequence[tuple[bytes, bytes]]


def _has_traceparent(headers: ParentHeaders) -> bool:
    """Whether the client sent one; raw ASGI header lines are looked through in C."""
    if type(headers) is list or isinstance(headers, tuple):  # not ``list | tuple``: made per call
        return _RAW_TRACEPARENT in map(_NAME, headers)
    return _TRACEPARENT in headers


@functools.lru_cache(maxsize=256)  # a few replicas' URLs, each with a path or two
def server_of(url: str) -> tuple[str | None, int | None, int]:
    """The host and port a replica's URL names (None where it names none), and its
    scheme's default port: a span's ``server.address`` and ``server.port``."""
    parts = urlsplit(url)
    return parts.hostname, parts.port, 443 if parts.scheme == "https" else 80


def _carrier(headers: ParentHeaders) -> Mapping[str, str]:
    """The headers as the W3C propagator reads them: a mapping of lower-case names."""
    if isinstance(headers, Mapping):
        return headers
    return {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in headers}


class _Failures:
    """Counts each telemetry failure through the hook; logs the first, then once a minute."""

    def __init__(self, hook: FailureHook | None):
        self._hook = hook
        self._lock = threading.Lock()
        self._last_log = -_LOG_EVERY_S
        self._quiet = 0

    def __call__(self, where: str, exc: BaseException | None = None) -> None:
        if self._hook is not None:
            try:
                self._hook(where)
            except Exception:
                log.debug("telemetry on_failure hook failed", exc_info=True)
        if exc is None:  # already logged by whoever saw it (the SDK's exporter)
            return
        with self._lock:
            now = time.monotonic()
            if now - self._last_log < _LOG_EVERY_S:
                self._quiet += 1
                return
            quiet, self._quiet, self._last_log = self._quiet, 0, now
        log.warning(
            "telemetry %s failed (%d more failures not logged since the last)",
            where,
            quiet,
            exc_info=exc,
        )


class Step:
    """A child span (``tollway.cache_lookup``, the upstream ``POST``...) as a context manager.

    An exception leaving the block marks it failed (``error.type`` = the exception's
    class name) and propagates unchanged. Inert when tracing is off.
    """

    __slots__ = ("_failed", "_span", "_traceparent")

    def __init__(
        self,
        span: Span | None = None,
        failed: _Failures | None = None,
        traceparent: str | None = None,
    ):
        self._span = span
        self._failed = failed or _Failures(None)
        self._traceparent = traceparent  # an unsampled root's, written as is

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._span is None:
            return
        try:
            if exc_type is not None:
                self.set_error(exc_type.__qualname__)
            self._span.end()
        except Exception as failure:  # noqa: BLE001 - telemetry never fails a request
            self._failed("child", failure)

    def end(self, error_type: str | None = None) -> None:
        """End a step that outlives a ``with`` block (the upstream call of a stream)."""
        if self._span is None:
            return
        if error_type is not None:
            self.set_error(error_type)
        try:
            self._span.end()
        except Exception as failure:  # noqa: BLE001 - telemetry never fails a request
            self._failed("child", failure)

    def set_attribute(self, key: str, value: str | bool | int | float) -> None:
        if self._span is not None:
            try:
                self._span.set_attribute(key, value)
            except Exception as exc:  # noqa: BLE001
                self._failed("child", exc)

    def set_error(self, error_type: str) -> None:
        """Mark the step failed without an exception."""
        if self._span is not None:
            try:
                self._span.set_attribute("error.type", error_type)
                self._span.set_status(Status(StatusCode.ERROR))
            except Exception as exc:  # noqa: BLE001
                self._failed("child", exc)

    def set_status_code(self, status: int) -> None:
        """The upstream's HTTP status; >= 400 fails the attempt (HTTP client conventions)."""
        self.set_attribute("http.response.status_code", status)
        if status >= 400:
            self.set_error(str(status))

    def inject_headers(self, headers: dict[str, str]) -> None:
        """Add ``traceparent`` (and ``tracestate``) naming this span to outgoing headers."""
        if self._traceparent is not None:
            headers["traceparent"] = self._traceparent
        elif type(self._span) is LiteSpan:  # spelled as the W3C propagator spells it
            context = self._span.context
            if context.is_valid:
                headers["traceparent"] = (
                    f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
                )
                if context.trace_state:
                    headers["tracestate"] = context.trace_state.to_header()
        elif self._span is not None:
            try:
                _W3C.inject(headers, trace.set_span_in_context(self._span))
            except Exception as exc:  # noqa: BLE001
                self._failed("inject", exc)


_INERT_STEP = Step()  # holds nothing, so one serves every request when tracing is off
INERT = _INERT_STEP


class RequestSpan:
    """One request's span, from ``Telemetry.start_request``; inert when tracing is off."""

    __slots__ = (
        "_context",
        "_done",
        "_first_chunk",
        "_operation",
        "_recording",
        "_span",
        "_started",
        "_t",
        "_up",
        "traced",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        span: Span | None,
        operation: str,
        propagate: Step | None = None,
    ):
        self._t = telemetry
        self._span = span
        self.traced = span is not None  # a span to finish (sampled or not); fixed from here
        self._recording = recording = span is not None and span.is_recording()
        self._operation = operation
        self._started = telemetry._clock() if span is not None else 0.0
        # The parent context of its children, for a tracer other than ``LiteTracer``.
        lite = type(span) is LiteSpan
        self._context = (
            trace.set_span_in_context(span) if span is not None and recording and not lite else None
        )
        self._first_chunk: float | None = None
        # An unsampled root (``propagate``) has no span, only the traceparent for vLLM.
        self._up: Step | None = propagate
        self._done = False

    @property
    def open(self) -> bool:
        """Whether ``finish`` has a span to end (not off, not an unsampled root, not ended)."""
        return self._span is not None and not self._done

    @property
    def wants_content(self) -> bool:
        """Whether ``finish`` would record a ``Content``: build one only then."""
        return self._recording and self._t.record_content and not self._done

    def child(self, name: str) -> Step:
        """A step of the request: ``with span.child("tollway.route"): ...``."""
        return self._open(name, SpanKind.INTERNAL, None)

    def upstream(self, url: str, *, method: str = "POST", attempt: int = 0) -> Step:
        """The HTTP call to vLLM, one per attempt (0 = first try); ``url`` has no credentials."""
        if self._span is None:
            return self._up or _INERT_STEP  # off, or an unsampled root's traceparent
        if not self._recording:
            # Sampled out: no span, yet vLLM still learns that the trace is unsampled.
            self._up = Step(trace.NonRecordingSpan(self._span.get_span_context()), self._t._failed)
            return self._up
        try:
            address, port, default_port = server_of(url)
            attributes: dict[str, Any] = {
                "http.request.method": method,
                "server.address": address or "",
                "server.port": port or default_port,
                "url.full": url,
            }
            if attempt:
                attributes["http.request.resend_count"] = attempt
        except Exception as exc:  # noqa: BLE001 - telemetry never fails a request
            self._t._failed("upstream", exc)
            return _INERT_STEP
        self._up = self._open(method, SpanKind.CLIENT, attributes)
        return self._up

    def _open(self, name: str, kind: SpanKind, attributes: dict[str, Any] | None) -> Step:
        tracer = self._t._tracer
        if not self._recording or tracer is None:
            return _INERT_STEP
        try:
            span = self._span
            if type(span) is LiteSpan:  # made by the telemetry's LiteTracer
                return Step(span.tracer.start_child(name, span, kind, attributes), self._t._failed)
            return Step(tracer.start_span(name, self._context, kind, attributes), self._t._failed)
        except Exception as exc:  # noqa: BLE001
            self._t._failed("child", exc)
            return _INERT_STEP

    def inject_headers(self, headers: dict[str, str]) -> None:
        """Add ``traceparent`` for vLLM: the latest upstream attempt's, else this span's."""
        if self._up is not None:
            self._up.inject_headers(headers)
        elif self._span is not None:
            Step(self._span, self._t._failed).inject_headers(headers)

    def set_route(self, tier: str, score: float | None, reason: str) -> None:
        if self._span is None:
            return
        try:
            attributes: dict[str, Any] = {"tollway.tier": tier, "tollway.route.reason": reason}
            if score is not None:
                attributes["tollway.route.score"] = float(score)
            self._span.set_attributes(attributes)
        except Exception as exc:  # noqa: BLE001
            self._t._failed("route", exc)

    def annotate(self, attributes: Mapping[str, str | bool | int | float]) -> None:
        """Extra attributes on the request's span (a fallback tier, say)."""
        if self._span is None:
            return
        try:
            self._span.set_attributes(attributes)
        except Exception as exc:  # noqa: BLE001
            self._t._failed("annotate", exc)

    def mark_first_chunk(self) -> None:
        """A stream's first chunk arrived: gives ``gen_ai.response.time_to_first_chunk``."""
        if self._span is not None and self._first_chunk is None:
            self._first_chunk = self._t._clock()

    def finish(
        self,
        report: RequestReport,
        *,
        server_address: str | None = None,
        server_port: int | None = None,
        response_model: str | None = None,
        content: Content | None = None,
    ) -> None:
        """Set the outcome from ``report`` and end the span; later calls do nothing.

        ``server_address``/``server_port``: the vLLM replica that answered (none for a
        cache hit); ``response_model`` defaults to ``report.model``.
        """
        span = self._span
        if span is None or self._done:
            return
        self._done = True
        try:
            if self._recording:
                attributes = report_attributes(report, response_model)
                if server_address:
                    attributes["server.address"] = server_address
                    if server_port is not None:
                        attributes["server.port"] = server_port
                if self._first_chunk is not None:
                    ttfc = self._first_chunk - self._started
                    attributes["gen_ai.response.time_to_first_chunk"] = ttfc
                span.set_attributes(attributes)
                if "error.type" in attributes:
                    span.set_status(Status(StatusCode.ERROR, attributes["error.type"]))
                if content is not None and self._t.record_content:
                    self._record(span, content)
        except Exception as exc:  # noqa: BLE001 - telemetry never fails a request
            self._t._failed("finish", exc)
        self._end(span)

    def _record(self, span: Span, content: Content) -> None:
        try:
            span.set_attributes(content_attributes(self._operation, content))
        except Exception as exc:  # noqa: BLE001 - malformed content loses only itself
            self._t._failed("content", exc)

    def fail(self, error_type: str) -> None:
        """End the span as failed when there is no report; no-op once ended."""
        span = self._span
        if span is None or self._done:
            return
        self._done = True
        try:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        except Exception as exc:  # noqa: BLE001
            self._t._failed("finish", exc)
        self._end(span)

    def _end(self, span: Span) -> None:
        try:
            span.end()
        except Exception as exc:  # noqa: BLE001
            self._t._failed("finish", exc)

    def __enter__(self) -> RequestSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leaving a ``with`` block before ``finish`` ends the span, failed if by an exception."""
        if exc_type is not None:
            self.fail(exc_type.__qualname__)
        elif self._span is not None and not self._done:
            self._done = True
            self._end(self._span)


class _DroppedCall(Step):
    """The upstream call of a dropped root: no span; its ``traceparent`` drawn per attempt."""

    __slots__ = ("_roots",)

    def __init__(self, roots: RootSampler):
        super().__init__()
        self._roots = roots

    def inject_headers(self, headers: dict[str, str]) -> None:
        headers["traceparent"] = self._roots.dropped_traceparent()


class _DroppedRoot(RequestSpan):
    """Every root the sampler dropped: no span, and one object for all of them.

    Most requests are this, so nothing is built per request: every method of
    ``RequestSpan`` it does not override returns at once when ``_span`` is
    None, and its upstream call draws a fresh unsampled ``traceparent`` for
    each attempt (``RootSampler.dropped_traceparent``).
    """

    __slots__ = ()

    def __init__(self, telemetry: Telemetry, roots: RootSampler):
        super().__init__(telemetry, None, "", _DroppedCall(roots))

    def child(self, name: str) -> Step:
        return _INERT_STEP

    def upstream(self, url: str, *, method: str = "POST", attempt: int = 0) -> Step:
        assert self._up is not None
        return self._up


class Telemetry:
    """Makes request spans from one tracer provider; with none, everything is inert."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        record_content: bool = False,
        on_failure: FailureHook | None = None,
        owns_provider: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._provider = tracer_provider
        self._owns = owns_provider
        tracer = tracer_provider.get_tracer(TRACER_NAME) if tracer_provider else None
        # The SDK's tracer makes light spans (metering.lite_span), and its roots are
        # sampled before any span object exists (metering.sampling).
        self._tracer: LiteTracer | Tracer | None = (
            LiteTracer(tracer) if isinstance(tracer, SdkTracer) else tracer
        )
        lite = self._tracer
        self._roots = RootSampler(lite) if isinstance(lite, LiteTracer) else None
        self._dropped = _DroppedRoot(self, self._roots) if self._roots is not None else None
        self._failed = _Failures(on_failure)
        self._clock = clock
        self._inert = RequestSpan(self, None, "")
        self.record_content = record_content

    @classmethod
    def from_env(
        cls,
        service_name: str = "tollway",
        record_content: bool = False,
        on_failure: FailureHook | None = None,
    ) -> Telemetry:
        """Trace only when the standard ``OTEL_*`` variables ask for an exporter.

        See ``metering.span_export.build_provider`` for the variables read and
        for the default sampling (``parentbased_traceidratio`` at 1% unless
        ``OTEL_TRACES_SAMPLER`` says otherwise). The global tracer provider is
        never touched.
        """
        failed = _Failures(on_failure)
        provider = build_provider(os.environ, service_name, failed)
        if provider is None:
            return cls(None, record_content=record_content, on_failure=on_failure)
        telemetry = cls(
            provider, record_content=record_content, on_failure=on_failure, owns_provider=True
        )
        telemetry._failed = failed
        return telemetry

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_request(
        self,
        *,
        operation: str,
        request_model: str,
        request_params: Mapping[str, Any] | None = None,
        parent_headers: ParentHeaders | None = None,
    ) -> RequestSpan:
        """Open a request's span. ``parent_headers``, the client's (a mapping of lower-case
        names, a case-insensitive one, or ASGI's raw lines), may hold a W3C ``traceparent``
        to join."""
        if self._tracer is None:
            return self._inert
        try:
            parent = None
            if parent_headers is not None and _has_traceparent(parent_headers):
                parent = _W3C.extract(_carrier(parent_headers))
            roots = self._roots if parent is None else None
            dropped = self._dropped
            if roots is not None and dropped is not None and roots.presample():
                return dropped  # no span: vLLM is only told the trace is unsampled
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": request_model,
            }
            name = f"{operation} {request_model}"
            if roots is not None:
                root = roots.start(name, SpanKind.CLIENT, attributes)
                if isinstance(root, Unsampled):  # dropped: no span, only its traceparent
                    vllm = Step(None, self._failed, root.traceparent)
                    return RequestSpan(self, None, operation, vllm)
                span = root
            else:
                span = self._tracer.start_span(name, parent, SpanKind.CLIENT, attributes)
            if request_params and span.is_recording():  # the sampler needs only the above
                span.set_attributes(request_attributes(request_params))
            return RequestSpan(self, span, operation)
        except Exception as exc:  # noqa: BLE001 - telemetry never fails a request
            self._failed("start", exc)
            return self._inert

    def shutdown(self) -> None:
        """Flush and stop the provider ``from_env`` built; a provider passed in is left be.

        Bounded by the exporter's own timeout (``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s).
        """
        provider, self._provider, self._tracer = self._provider, None, None
        if self._owns and isinstance(provider, SdkTracerProvider):
            try:
                provider.shutdown()
            except Exception as exc:  # noqa: BLE001
                self._failed("shutdown", exc)
