"""Sampled spans without the SDK's per-span machinery: plain data, handed to its processors.

The SDK's ``Tracer.start_span`` builds a ``_Span`` with a lock, bounded
attribute and event containers that validate every value as it is set, and
copies it into a ``ReadableSpan`` when it ends: about 70 us per span on this
machine, so a traced request (a root and three children) cost ~270 us before
the exporter saw it. The gateway's spans are never made current, never shared
with instrumentation and written by one thread, so ``LiteTracer`` makes
``LiteSpan``s instead: the sampler, the id generator, the resource, the
instrumentation scope, the span limits and the span processors are the SDK
tracer's own, and what the processors receive at the end is the SDK's own
``ReadableSpan`` with ``BoundedAttributes`` (values validated and truncated to
``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`` once, at the end). Exporters cannot tell
the difference. Behind ``LiteBatchSpanProcessor`` (what ``metering.span_export``
builds) that ``ReadableSpan`` is made in the processor's export thread, a batch
at a time, not on the event loop: at 100% sampling the metered gateway's CPU
per request fell by ~6% (bench/RESULTS.md, 2026-11-23, session 9). A span's
attribute values must therefore not be changed after they are set (the
gateway sets strings, numbers, and sequences it built for the span).

What is left out: processors' ``on_start`` (called with the SDK's live span;
the batch and simple processors do nothing there), the SDK's tracer
configurator (``_is_enabled``) and its experimental self-metrics. Two of the
tracer's fields are private (``_span_limits``, ``_instrumentation_scope``):
if an SDK release renames them, ending a span fails, which the caller counts
as a telemetry failure, and tests/metering/test_lite_span.py fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    StaticSampler,
    _AlwaysOff,
    _AlwaysOn,
    _ParentBasedAlwaysOff,
    _ParentBasedAlwaysOn,
)
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

# The SDK's own parent-based samplers, as ``OTEL_TRACES_SAMPLER`` builds them: these only
# set up ``ParentBased``'s fields, so they decide as it does. Subclasses of anyone
# else's may decide otherwise: they are asked.
PARENT_BASED = (ParentBased, ParentBasedTraceIdRatio, _ParentBasedAlwaysOff, _ParentBasedAlwaysOn)
_STATIC = (StaticSampler, _AlwaysOff, _AlwaysOn)  # and these always decide the same
_ROOT = TraceFlags(TraceFlags.SAMPLED)
_ROOT_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)


class LiteTracer:
    """``start_span`` as the SDK's tracer decides it, making ``LiteSpan``s."""

    def __init__(self, sdk: SdkTracer):
        self.sdk = sdk
        # Whether a sampled local parent's children are sampled with its trace state, as
        # the SDK's parent-based samplers decide by default: then ``start_child`` asks
        # nobody.
        self._children_follow = _children_follow(sdk.sampler)
        self._processors: object = None  # the provider's processors when last looked at
        self._takes_lite = False  # whether they all take a LiteSpan as it is

    @property
    def sampler(self) -> Sampler:
        return self.sdk.sampler

    @property
    def id_generator(self) -> IdGenerator:
        return self.sdk.id_generator

    @id_generator.setter
    def id_generator(self, ids: IdGenerator) -> None:
        self.sdk.id_generator = ids

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
    ) -> trace.Span:
        """The SDK's decision (parent, ids, sampler, flags); a ``LiteSpan`` when it records."""
        sdk = self.sdk
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = sdk.id_generator.generate_trace_id()
            random_id = sdk.id_generator.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        result = sdk.sampler.should_sample(context, trace_id, name, kind, attributes)
        decision = result.decision
        flags = TraceFlags.SAMPLED if decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            sdk.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=result.trace_state,
        )
        if decision is Decision.DROP:
            return trace.NonRecordingSpan(span_context)
        return LiteSpan(self, name, span_context, parent, kind, dict(result.attributes or {}))

    def start_root(
        self,
        name: str,
        trace_id: int,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
    ) -> LiteSpan:
        """A root the tracer's sampler is known to keep with ``trace_id``: the span
        ``start_span`` would make for it, without asking the sampler again.

        For ``metering.sampling.RootSampler``, once it applied the rule of one of the
        SDK's own samplers (a ratio, always on, or parent-based over either): for a
        root those sample with the attributes given, no trace state, and the id
        generator's random-trace-id flag (tests/metering/test_sampling.py compares).
        """
        ids = self.sdk.id_generator
        flags = _ROOT_RANDOM if ids.is_trace_id_random() else _ROOT
        span_context = SpanContext(trace_id, ids.generate_span_id(), False, flags)
        return LiteSpan(self, name, span_context, None, kind, dict(attributes or {}))

    def start_child(
        self,
        name: str,
        parent: LiteSpan,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
    ) -> trace.Span:
        """A child of ``parent``, as ``start_span`` with ``parent`` in the context would make it.

        Under the SDK's parent-based samplers (what ``OTEL_TRACES_SAMPLER`` builds,
        and the gateway's default) a sampled local parent's child is sampled, with
        the parent's trace state and flags: that is decided here, without a context,
        a sampling result or the sampler's calls (a traced request has three or four
        children). Any other sampler, or an unsampled parent, goes through
        ``start_span``.
        """
        context = parent.context
        if not (self._children_follow and context.trace_flags.sampled):
            return self.start_span(name, trace.set_span_in_context(parent), kind, attributes)
        span_context = SpanContext(
            context.trace_id,
            self.sdk.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=context.trace_flags,
            trace_state=context.trace_state,
        )
        return LiteSpan(self, name, span_context, context, kind, dict(attributes or {}))

    def end(self, span: LiteSpan) -> None:
        """Hand the ended span to the SDK's processors: as it is when every one of them is a
        ``LiteBatchSpanProcessor`` (it becomes a ``ReadableSpan`` in their export thread),
        else as the SDK's ``ReadableSpan``, made here."""
        processor = self.sdk.span_processor
        # SynchronousMultiSpanProcessor's tuple, replaced whenever a processor is added
        processors = getattr(processor, "_span_processors", None)
        if processors is not self._processors:
            self._processors = processors
            self._takes_lite = bool(processors) and all(
                type(p) is LiteBatchSpanProcessor for p in processors or ()
            )
        processor.on_end(span if self._takes_lite else span.readable())  # type: ignore[arg-type]


class LiteBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, also for ended ``LiteSpan``s: queued as they are, made
    ``ReadableSpan``s in its export thread just before its exporter sees them.

    A traced request's spans then cost the event loop no ``BoundedAttributes``
    and no ``ReadableSpan`` (the bulk of ending a span): that work runs in the
    export thread, a batch at a time. ``LiteTracer`` hands a ``LiteSpan`` over
    as it is only when every processor of the provider is one of these.
    """

    def __init__(self, exporter: SpanExporter, **options: Any):
        super().__init__(_Readable(exporter), **options)


class _Readable(SpanExporter):
    """An exporter that is handed ``LiteSpan``s as well, and passes ``ReadableSpan``s on."""

    def __init__(self, inner: SpanExporter):
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan | LiteSpan]) -> SpanExportResult:
        return self.inner.export([s.readable() if isinstance(s, LiteSpan) else s for s in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class LiteSpan(trace.Span):
    """A recording span as plain fields; ``end()`` hands it to the tracer once."""

    __slots__ = (
        "attributes",
        "context",
        "end_time",
        "events",
        "kind",
        "name",
        "parent",
        "start_time",
        "status",
        "tracer",
    )

    def __init__(
        self,
        tracer: LiteTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
    ):
        self.tracer = tracer
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.events: list[Event] = []
        self.status = Status(StatusCode.UNSET)
        self.start_time = time_ns()
        self.end_time: int | None = None

    def get_span_context(self) -> SpanContext:
        return self.context

    def readable(self) -> ReadableSpan:
        """The ended span as the SDK's ``ReadableSpan``, its attributes bounded by the
        tracer's limits (``OTEL_ATTRIBUTE_*``, ``OTEL_SPAN_ATTRIBUTE_*``) as the SDK's own
        span would have them."""
        sdk = self.tracer.sdk
        limits = sdk._span_limits
        attributes = BoundedAttributes(
            limits.max_span_attributes,
            self.attributes,
            immutable=True,
            max_value_len=limits.max_span_attribute_length,
        )
        return ReadableSpan(
            name=self.name,
            context=self.context,
            parent=self.parent,
            resource=sdk.resource,
            attributes=attributes,
            events=self.events,
            kind=self.kind,
            instrumentation_info=sdk.instrumentation_info,
            status=self.status,
            start_time=self.start_time,
            end_time=self.end_time,
            instrumentation_scope=sdk._instrumentation_scope,
        )

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self.end_time is None:
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self.end_time is None:
            self.attributes.update(attributes)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.end_time is None:
            self.events.append(Event(name, attributes, timestamp or time_ns()))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK: UNSET is ignored, and so is anything once the status is OK."""
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        new = status if isinstance(status, Status) else Status(status, description)
        if new.status_code is not StatusCode.UNSET:
            self.status = new

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The exception as an ``exception`` event (the semantic conventions' attributes)."""
        details: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.escaped": str(escaped),
        }
        details.update(attributes or {})
        self.add_event("exception", details, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time or time_ns()
        self.tracer.end(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()


def _children_follow(sampler: Sampler) -> bool:
    """Whether ``sampler`` samples every child of a sampled local parent, adding no
    attributes and keeping the parent's trace state: the SDK's own parent-based
    samplers with an always-on ``local_parent_sampled`` (their default). Reads the
    private ``ParentBased._local_parent_sampled`` and ``StaticSampler._decision``; if
    a later SDK renames them, children are decided as the SDK would
    (tests/metering/test_lite_span.py checks which)."""
    if type(sampler) not in PARENT_BASED:
        return False
    local = getattr(sampler, "_local_parent_sampled", None)
    return static_decision(local) is Decision.RECORD_AND_SAMPLE


def static_decision(sampler: object) -> Decision | None:
    """The fixed decision of one of the SDK's own static samplers (always on, always off);
    None for any other sampler, or if a later SDK renames ``StaticSampler._decision``."""
    if type(sampler) not in _STATIC:
        return None
    decision: Decision | None = getattr(sampler, "_decision", None)
    return decision
