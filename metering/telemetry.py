"""OpenTelemetry spans for each request: the GenAI semantic conventions plus ``tollway.*`` cost.

The report (``metering.report``) stays plain data; this module turns it into
spans. One request, joined to the client's trace when it sent a ``traceparent``::

    chat auto                CLIENT    gen_ai.* request, usage, cost; tollway.* figures
    +- tollway.route         INTERNAL
    +- tollway.cache_lookup  INTERNAL
    +- tollway.queue_wait    INTERNAL
    +- POST                  CLIENT    one per upstream attempt; its traceparent goes to vLLM

Choices, per the GenAI conventions of today (``gen_ai.client.inference``, still
Development, so the latest version is emitted):

- Kind CLIENT: the operation calls a model in another process. Each HTTP
  attempt is a child, as HTTP instrumentation under a GenAI span would be.
- Errors follow "Recording Errors" and the HTTP client rules that go with
  CLIENT: a request that produced no completion failed, so status >= 400 or a
  ``report.error_type`` (say a stream broken after its 200) sets ``error.type``
  (the report's type, else the status code) and status ERROR; with no finish
  reason received, ``gen_ai.response.finish_reasons`` is ``["error"]``.
- Cost: the proposed ``gen_ai.usage.cost.*`` (marginal USD as a double, source
  ``local``: tollway priced it itself); everything else as ``tollway.*``.
- Content only with ``record_content``: ``gen_ai.input.messages`` and
  ``gen_ai.output.messages`` in the conventions' ``role``/``parts`` schema, as
  structured attribute values (the SDK exports them as OTLP arrays/maps; the
  conventions prefer that to JSON strings). String lengths are capped by
  ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``.
- Spans are never made "current": a stream can end in another task than it
  began in, where detaching a context fails. Parents are passed explicitly.

Nothing here may fail a request: each call catches its own errors, counts them
through ``on_failure(where)`` and logs at most once a minute. With tracing off
every call returns at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from metering.report import RequestReport

log = logging.getLogger("tollway.telemetry")

PROVIDER = "vllm"
TRACER_NAME = "tollway.metering.telemetry"
FailureHook = Callable[[str], None]

_W3C = TraceContextTextMapPropagator()
_LOG_EVERY_S = 60.0
_FLOAT_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
}
_OUTPUT_TYPES = {"text": "text", "json_object": "json", "json_schema": "json"}


@dataclass(frozen=True, slots=True)
class Content:
    """What was said, shaped as OpenAI shapes it; converted only if content is recorded.

    ``input``: the request's ``messages`` (chat) or ``prompt`` (text_completion).
    ``choices``: the response's ``choices``; a stream passes those it assembled,
    ``{"message": {"role": "assistant", "content": text}}`` or ``{"text": text}``.
    """

    input: Any
    choices: Sequence[Mapping[str, Any]] = ()


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


class _CountingExporter(SpanExporter):
    """Passes spans on; a batch that fails to export is counted as ``export``."""

    def __init__(self, inner: SpanExporter, failed: _Failures):
        self._inner = inner
        self._failed = failed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            log.debug("span export raised", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._failed("export")
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class Step:
    """A child span (``tollway.cache_lookup``, the upstream ``POST``...) as a context manager.

    An exception leaving the block marks it failed (``error.type`` = the exception's
    class name) and propagates unchanged. Inert when tracing is off.
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
        if self._span is not None:
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
    )

    def __init__(self, telemetry: Telemetry, span: Span | None, operation: str):
        self._t = telemetry
        self._span = span
        self._recording = span is not None and span.is_recording()
        self._operation = operation
        self._started = telemetry._clock() if span is not None else 0.0
        self._context = trace.set_span_in_context(span) if span is not None else None
        self._first_chunk: float | None = None
        self._up: Step | None = None
        self._done = False

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
            return _INERT_STEP
        if not self._recording:
            # Sampled out: no span, yet vLLM still learns that the trace is unsampled.
            self._up = Step(trace.NonRecordingSpan(self._span.get_span_context()), self._t._failed)
            return self._up
        try:
            parts = urlsplit(url)
            attributes: dict[str, Any] = {
                "http.request.method": method,
                "server.address": parts.hostname or "",
                "server.port": parts.port or (443 if parts.scheme == "https" else 80),
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

        On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
        is set or ``OTEL_TRACES_EXPORTER`` names ``otlp``/``console``; off when it says
        ``none`` or ``OTEL_SDK_DISABLED=true``. OTLP goes over http/protobuf (the
        exporter installed). Endpoint, headers, timeout, sampler and resource
        (``OTEL_SERVICE_NAME`` wins over ``service_name``) are read by the SDK itself.
        The global tracer provider is never touched.
        """
        env = os.environ
        off = cls(None, record_content=record_content, on_failure=on_failure)
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return off
        names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")} - {""}
        if not names and (
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        ):
            names = {"otlp"}
        if "none" in names:
            return off
        exporters: list[SpanExporter] = []
        for name in sorted(names):
            if name == "otlp":
                exporters.append(_otlp_exporter(env))
            elif name == "console":
                exporters.append(ConsoleSpanExporter())
            else:
                log.warning("OTEL_TRACES_EXPORTER=%s is not supported; ignored", name)
        if not exporters:
            return off
        resource = Resource.create({})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        provider = SdkTracerProvider(resource=resource)
        telemetry = cls(
            provider, record_content=record_content, on_failure=on_failure, owns_provider=True
        )
        for exporter in exporters:
            provider.add_span_processor(
                BatchSpanProcessor(_CountingExporter(exporter, telemetry._failed))
            )
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
        parent_headers: Mapping[str, str] | None = None,
    ) -> RequestSpan:
        """Open a request's span. ``parent_headers``, the client's (lower-case names or a
        case-insensitive mapping), may hold a W3C ``traceparent`` to join."""
        if self._tracer is None:
            return self._inert
        try:
            parent = None
            if parent_headers is not None and "traceparent" in parent_headers:
                parent = _W3C.extract(parent_headers)
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": request_model,
            }
            name = f"{operation} {request_model}"
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


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not installed; exporting http/protobuf", protocol)
    return OTLPSpanExporter()


def request_attributes(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``gen_ai.request.*`` attributes of an OpenAI request body; ill-typed values skipped."""
    out: dict[str, Any] = {}
    max_tokens = params.get("max_completion_tokens", params.get("max_tokens"))
    if _is_int(max_tokens):
        out["gen_ai.request.max_tokens"] = max_tokens
    if _is_int(seed := params.get("seed")):
        out["gen_ai.request.seed"] = seed
    if _is_int(top_k := params.get("top_k")) and top_k > 0:  # vLLM: -1 or 0 is "off"
        out["gen_ai.request.top_k"] = top_k
    for key, attr in _FLOAT_PARAMS.items():
        if _is_int(value := params.get(key)) or isinstance(value, float):
            out[attr] = float(value)
    if _is_int(n := params.get("n")) and n != 1:
        out["gen_ai.request.choice.count"] = n
    if params.get("stream") is True:
        out["gen_ai.request.stream"] = True
    stop = params.get("stop")
    if isinstance(stop, str):
        out["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        out["gen_ai.request.stop_sequences"] = stop
    response_format = params.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if isinstance(kind, str) and kind in _OUTPUT_TYPES:
        out["gen_ai.output.type"] = _OUTPUT_TYPES[kind]
    if isinstance(effort := params.get("reasoning_effort"), str):
        out["gen_ai.request.reasoning.level"] = effort
    return out


def report_attributes(report: RequestReport, response_model: str | None = None) -> dict[str, Any]:
    """Usage, cost and outcome attributes of a finished request, errors included."""
    out: dict[str, Any] = {
        "gen_ai.response.model": response_model or report.model,
        "gen_ai.usage.input_tokens": report.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": report.usage.completion_tokens,
        "gen_ai.usage.cost.amount": float(report.cost.marginal),
        "gen_ai.usage.cost.currency": "USD",
        "gen_ai.usage.cost.source": "local",
        "tollway.request_id": report.request_id,
        "tollway.tenant": report.tenant,
        "tollway.tier": report.tier,
        "tollway.cache": report.cache,
        "tollway.gpu_seconds": report.gpu_seconds,
        "tollway.cost.loaded_usd": float(report.cost.loaded),
        "tollway.attempts": report.attempts,
    }
    if report.usage.cached_prompt_tokens:
        out["gen_ai.usage.cache_read.input_tokens"] = report.usage.cached_prompt_tokens
    if report.response_id:
        out["gen_ai.response.id"] = report.response_id
    if report.saved is not None:
        out["tollway.cost.saved_usd"] = float(report.saved)
    if report.replica:
        out["tollway.replica"] = report.replica
    error = error_type(report)
    if error is not None:
        out["error.type"] = error
    if report.finish_reasons or error is not None:
        out["gen_ai.response.finish_reasons"] = list(report.finish_reasons) or ["error"]
    return out


def error_type(report: RequestReport) -> str | None:
    """The request's ``error.type``: the gateway's own type, else a failing status code."""
    if report.error_type:
        return report.error_type
    return str(report.status) if report.status >= 400 else None


def content_attributes(operation: str, content: Content) -> dict[str, Any]:
    """``gen_ai.input.messages`` and ``gen_ai.output.messages``, structured."""
    if operation == "chat":
        messages = content.input if isinstance(content.input, list) else ()
        inputs = [_chat_message(m, "user") for m in messages if isinstance(m, Mapping)]
        outputs = [_chat_message(c.get("message") or {}, "assistant") for c in content.choices]
    else:
        prompts = [content.input] if isinstance(content.input, str) else content.input
        inputs = [_message("user", [_text(p)]) for p in prompts if isinstance(p, str)]
        outputs = [_message("assistant", [_text(c.get("text"))]) for c in content.choices]
    return {"gen_ai.input.messages": inputs, "gen_ai.output.messages": outputs}


def _chat_message(message: Mapping[str, Any], default_role: str) -> dict[str, Any]:
    role = message.get("role") or default_role
    parts: list[dict[str, Any]] = []
    if isinstance(reasoning := message.get("reasoning_content") or message.get("reasoning"), str):
        parts.append(_part(type="reasoning", content=reasoning))
    body = message.get("content")
    if role == "tool":
        parts.append(
            _part(type="tool_call_response", id=message.get("tool_call_id"), response=body)
        )
    elif isinstance(body, str):
        parts.append(_text(body))
    else:
        parts.extend(_openai_part(p) for p in body or () if isinstance(p, Mapping))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        name, arguments = function.get("name"), function.get("arguments")
        parts.append(_part(type="tool_call", id=call.get("id"), name=name, arguments=arguments))
    out = _message(role, parts)
    if isinstance(participant := message.get("name"), str):
        out["name"] = participant
    return out


def _openai_part(part: Mapping[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return _text(part.get("text"))
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url")
        return _part(type="uri", modality="image", uri=url)
    return {"type": str(kind)}  # other kinds are named, their payload left out


def _message(role: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": role, "parts": parts}


def _text(text: Any) -> dict[str, Any]:
    return _part(type="text", content=text)


def _part(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
