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
- Sampling is the tracer provider's, decided when the request's span starts
  (``metering.span_export``). A request sampled out holds the SDK's
  non-recording span: it records nothing and has no children, yet its
  ``traceparent`` still tells vLLM that the trace is unsampled.

Nothing here may fail a request: each call catches its own errors, counts them
through ``on_failure(where)`` and logs at most once a minute.

The mapping names (``Content``, ``request_attributes``, ``report_attributes``,
``error_type``, ``content_attributes``, ``PROVIDER``) live in ``metering.genai``
and are re-exported here.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from metering.genai import PROVIDER as PROVIDER
from metering.genai import Content as Content
from metering.genai import content_attributes as content_attributes
from metering.genai import error_type as error_type
from metering.genai import report_attributes as report_attributes
from metering.genai import request_attributes as request_attributes
from metering.report import RequestReport
from metering.span_export import build_provider

log = logging.getLogger("tollway.telemetry")

TRACER_NAME = "tollway.metering.telemetry"
FailureHook = Callable[[str], None]
ParentHeaders = Mapping[str, str] | Sequence[tuple[bytes, bytes]]

_W3C = TraceContextTextMapPropagator()
_LOG_EVERY_S = 60.0


class _RawHeaders(Getter[Sequence[tuple[bytes, bytes]]]):
    """Reads ASGI's raw header lines for the W3C propagator."""

    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode("latin-1")
        found = [bytes(v).decode("latin-1") for k, v in carrier if bytes(k).lower() == name]
        return found or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [bytes(k).decode("latin-1").lower() for k, _ in carrier]


_RAW_HEADERS = _RawHeaders()


def _parent_of(headers: ParentHeaders | None) -> otel_context.Context | None:
    """The context holding the client's ``traceparent``; without one, the current context."""
    if headers is None:
        return None
    current = otel_context.get_current()
    if isinstance(headers, Mapping):
        return _W3C.extract(headers, current)
    return _W3C.extract(headers, current, _RAW_HEADERS)


@functools.lru_cache(maxsize=256)  # a few replicas' URLs, each with a path or two
def server_of(url: str) -> tuple[str | None, int | None, int]:
    """The host and port a replica's URL names (None where it names none), and its
    scheme's default port: a span's ``server.address`` and ``server.port``."""
    parts = urlsplit(url)
    return parts.hostname, parts.port, 443 if parts.scheme == "https" else 80


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
    class name) and propagates unchanged. Inert without a span.
    """

    __slots__ = ("_failed", "_span")

    def __init__(self, span: Span | None = None, failed: _Failures | None = None):
        self._span = span
        self._failed = failed or _Failures(None)

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end(None if exc_type is None else exc_type.__qualname__)

    def end(self, error_type: str | None = None) -> None:
        """End the step; also for one that outlives a ``with`` block (a stream's upstream call)."""
        if self._span is None:
            return
        if error_type is not None:
            self.set_error(error_type)
        try:
            self._span.end()
        except Exception as exc:  # noqa: BLE001 - telemetry never fails a request
            self._failed("child", exc)

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
        if self._span is not None:
            try:
                _W3C.inject(headers, trace.set_span_in_context(self._span))
            except Exception as exc:  # noqa: BLE001
                self._failed("inject", exc)


INERT = Step()  # holds nothing, so one serves every request when tracing is off


class RequestSpan:
    """One request's span, from ``Telemetry.start_request``; inert when tracing is off."""

    __slots__ = (
        "_done",
        "_first_chunk",
        "_operation",
        "_recording",
        "_span",
        "_started",
        "_t",
        "_up",
    )

    def __init__(self, telemetry: Telemetry, span: Span | None, operation: str):
        self._t = telemetry
        self._span = span
        self._recording = span is not None and span.is_recording()  # sampled; fixed from here
        self._operation = operation
        self._started = telemetry._clock() if span is not None else 0.0
        self._first_chunk: float | None = None
        self._up: Step | None = None  # the latest upstream attempt
        self._done = False

    @property
    def traced(self) -> bool:
        """Whether the request was sampled: its span records, and ``finish`` puts the
        report on it. A sampled-out request's span (non-recording) only propagates."""
        return self._recording

    @property
    def open(self) -> bool:
        """Whether ``finish`` would still record the report: the span records, not yet ended."""
        return not self._done and self.traced

    @property
    def wants_content(self) -> bool:
        """Whether ``finish`` would record a ``Content``: build one only then."""
        return self._t.record_content and self.open

    def child(self, name: str) -> Step:
        """A step of the request: ``with span.child("tollway.route"): ...``."""
        if not self._recording:
            return INERT  # a sampled-out request's steps would be sampled out too
        return self._start(name, SpanKind.INTERNAL, None)

    def upstream(self, url: str, *, method: str = "POST", attempt: int = 0) -> Step:
        """The HTTP call to vLLM, one per attempt (0 = first try); ``url`` has no credentials."""
        span = self._span
        if span is None:
            return INERT
        if not self._recording:
            # Sampled out: nothing to record, yet vLLM still learns the trace is unsampled.
            self._up = Step(trace.NonRecordingSpan(span.get_span_context()), self._t._failed)
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
            return INERT
        self._up = self._start(method, SpanKind.CLIENT, attributes)
        return self._up

    def _start(self, name: str, kind: SpanKind, attributes: dict[str, Any] | None) -> Step:
        tracer = self._t._tracer
        if tracer is None:
            return INERT
        try:
            parent = trace.set_span_in_context(self._span) if self._span is not None else None
            span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        except Exception as exc:  # noqa: BLE001
            self._t._failed("child", exc)
            return INERT
        return Step(span, self._t._failed)

    def inject_headers(self, headers: dict[str, str]) -> None:
        """Add ``traceparent`` for vLLM: the latest upstream attempt's, else this span's."""
        if self._up is not None:
            self._up.inject_headers(headers)
        elif self._span is not None:
            Step(self._span, self._t._failed).inject_headers(headers)

    def set_route(self, tier: str, score: float | None, reason: str) -> None:
        attributes: dict[str, Any] = {"tollway.tier": tier, "tollway.route.reason": reason}
        if score is not None:
            attributes["tollway.route.score"] = float(score)
        self._set("route", attributes)

    def annotate(self, attributes: Mapping[str, str | bool | int | float]) -> None:
        """Extra attributes on the request's span (a fallback tier, say)."""
        self._set("annotate", attributes)

    def _set(self, where: str, attributes: Mapping[str, Any]) -> None:
        if self._span is not None:
            try:
                self._span.set_attributes(attributes)
            except Exception as exc:  # noqa: BLE001
                self._t._failed(where, exc)

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
        if self._recording:
            try:
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
            except Exception as exc:  # noqa: BLE001 - telemetry never fails a request
                self._t._failed("finish", exc)
            if content is not None and self._t.record_content:
                try:
                    span.set_attributes(content_attributes(self._operation, content))
                except Exception as exc:  # noqa: BLE001 - malformed content loses only itself
                    self._t._failed("content", exc)
        self._end(span)

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
        self._tracer = tracer_provider.get_tracer(TRACER_NAME) if tracer_provider else None
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
        telemetry = cls(None, record_content=record_content, on_failure=on_failure)
        provider = build_provider(service_name, telemetry._failed)
        if provider is not None:
            telemetry._provider, telemetry._owns = provider, True
            telemetry._tracer = provider.get_tracer(TRACER_NAME)
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
        tracer = self._tracer
        if tracer is None:
            return self._inert
        try:
            attributes: dict[str, Any] = {  # what the sampler is shown
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": request_model,
            }
            span = tracer.start_span(
                f"{operation} {request_model}",
                context=_parent_of(parent_headers),
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
            if request_params and span.is_recording():
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
