"""Light spans: what the SDK's processors receive is what the SDK's own spans would give them."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceState

from metering.lite_span import LiteBatchSpanProcessor, LiteSpan, LiteTracer


def both(
    sampler: Sampler = ALWAYS_ON, limits: SpanLimits | None = None
) -> tuple[LiteTracer, trace.Tracer, InMemorySpanExporter]:
    """A light tracer and the SDK's own, on one provider and one exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource.create({"service.name": "lite-test"}),
        span_limits=limits,
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sdk = provider.get_tracer("lite-test-scope", "1.0")
    assert not isinstance(sdk, LiteTracer)
    return LiteTracer(sdk), sdk, exporter  # type: ignore[arg-type]


def life(tracer: LiteTracer | trace.Tracer) -> None:
    root = tracer.start_span("root", None, SpanKind.CLIENT, {"a": 1, "tags": ["x", "y"]})
    child = tracer.start_span("child", trace.set_span_in_context(root), SpanKind.INTERNAL)
    child.set_attribute("b", "two")
    child.set_status(Status(StatusCode.ERROR, "broke"))
    child.end()
    root.set_attributes({"c": 3.5})
    root.end()


def test_the_exported_spans_match_the_sdks_own() -> None:
    lite, sdk, exporter = both()
    life(lite)
    life(sdk)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["child", "root", "child", "root"]
    mine, theirs = spans[:2], spans[2:]
    for a, b in zip(mine, theirs, strict=True):
        assert dict(a.attributes or {}) == dict(b.attributes or {})
        assert (a.kind, a.status.status_code, a.status.description) == (
            b.kind,
            b.status.status_code,
            b.status.description,
        )
        assert a.resource == b.resource
        assert a.instrumentation_scope == b.instrumentation_scope
        assert a.context.trace_flags == b.context.trace_flags
        assert a.start_time is not None
        assert a.end_time is not None
        assert a.end_time >= a.start_time
    child, root = mine
    assert child.parent is not None
    assert child.parent.span_id == root.context.span_id
    assert child.context.trace_id == root.context.trace_id
    assert root.parent is None


def test_limits_apply_once_at_the_end() -> None:
    lite, _, exporter = both(limits=SpanLimits(max_span_attribute_length=4))
    span = lite.start_span("s", None, SpanKind.INTERNAL, None)
    span.set_attribute("long", "abcdefgh")
    span.end()
    (done,) = exporter.get_finished_spans()
    assert (done.attributes or {})["long"] == "abcd"


def test_an_ended_span_changes_no_more_and_is_exported_once() -> None:
    lite, _, exporter = both()
    span = lite.start_span("s", None, SpanKind.INTERNAL, None)
    assert isinstance(span, LiteSpan)
    span.set_status(StatusCode.OK)
    span.set_status(Status(StatusCode.ERROR))  # OK sticks, as in the SDK
    span.set_status(StatusCode.UNSET)
    span.end()
    span.set_attribute("late", 1)
    span.end()
    assert not span.is_recording()
    (done,) = exporter.get_finished_spans()
    assert done.status.status_code is StatusCode.OK
    assert "late" not in (done.attributes or {})


def test_an_exception_leaving_the_span_is_recorded() -> None:
    lite, _, exporter = both()
    with pytest.raises(ValueError, match="bad"), lite.start_span("s", None, SpanKind.INTERNAL):
        raise ValueError("bad")
    (done,) = exporter.get_finished_spans()
    assert done.status.status_code is StatusCode.ERROR
    (event,) = done.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "ValueError"


def test_a_dropped_span_is_not_recorded_yet_carries_ids() -> None:
    lite, _, exporter = both(sampler=ALWAYS_OFF)
    span = lite.start_span("s", None, SpanKind.INTERNAL, None)
    assert not isinstance(span, LiteSpan)
    assert not span.is_recording()
    assert span.get_span_context().is_valid
    assert not span.get_span_context().trace_flags.sampled
    span.end()
    assert exporter.get_finished_spans() == ()


class CountingIds(IdGenerator):
    """Span ids 1, 2, 3...; one fixed trace id: two tracers make the same ids."""

    def __init__(self) -> None:
        self.next_span = 0

    def generate_span_id(self) -> int:
        self.next_span += 1
        return self.next_span

    def generate_trace_id(self) -> int:
        return 0x5EED


class Refuses(ParentBased):
    """Someone's own parent-based sampler: its children are asked for."""

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(Decision.DROP)


@pytest.mark.parametrize(
    ("sampler", "follows"),
    [
        (ParentBased(ALWAYS_ON), True),  # what the gateway defaults to (with a ratio root)
        (ParentBasedTraceIdRatio(1.0), True),
        (ParentBased(ALWAYS_ON, local_parent_sampled=ALWAYS_OFF), False),
        (ALWAYS_ON, False),
        (Refuses(ALWAYS_ON), False),
    ],
)
def test_a_child_is_the_child_start_span_would_make(sampler: Sampler, follows: bool) -> None:
    made = []
    for _ in range(2):
        provider = TracerProvider(sampler=sampler, id_generator=CountingIds())
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        lite = LiteTracer(provider.get_tracer("t"))  # type: ignore[arg-type]
        made.append((lite, exporter))
    (fast, fast_spans), (slow, slow_spans) = made
    assert fast._children_follow is follows
    state = TraceState([("vendor", "v1")])
    for tracer in (fast, slow):
        root = tracer.start_span("root", None, SpanKind.CLIENT, {"r": 1})
        if isinstance(root, LiteSpan):  # give it a trace state, as an incoming parent could
            c = root.context
            root.context = SpanContext(c.trace_id, c.span_id, False, c.trace_flags, state)
            child = (
                tracer.start_child("child", root, SpanKind.INTERNAL, {"c": "x"})
                if tracer is fast
                else tracer.start_span(
                    "child", trace.set_span_in_context(root), SpanKind.INTERNAL, {"c": "x"}
                )
            )
            child.end()
        root.end()
    ours, theirs = fast_spans.get_finished_spans(), slow_spans.get_finished_spans()
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.name, a.context, a.parent, a.kind) == (b.name, b.context, b.parent, b.kind)
        assert dict(a.attributes or {}) == dict(b.attributes or {})


def _exported(spans: Any) -> list[tuple[Any, ...]]:
    """What an exporter reads of each span, ids aside (two tracers draw different ones)."""
    return [
        (
            s.name,
            s.kind,
            dict(s.attributes or {}),
            s.status.status_code,
            s.status.description,
            s.resource,
            s.instrumentation_scope,
            s.parent is None,
            type(s).__name__,
        )
        for s in spans
    ]


def test_a_lite_batch_processor_takes_the_span_as_is_and_exports_readable_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ending a span makes no ReadableSpan on the caller's thread; the exporter still gets
    the ReadableSpans the eager path gives (limits applied)."""
    made: list[LiteSpan] = []
    readable = LiteSpan.readable
    monkeypatch.setattr(LiteSpan, "readable", lambda self: made.append(self) or readable(self))
    limits = SpanLimits(max_span_attribute_length=2)
    eager, _, eager_out = both(limits=limits)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "lite-test"}),
        span_limits=limits,
        shutdown_on_exit=False,
    )
    processor = LiteBatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    provider.add_span_processor(processor)
    lite = LiteTracer(provider.get_tracer("lite-test-scope", "1.0"))  # type: ignore[arg-type]
    life(lite)
    assert made == []  # queued as LiteSpans: nothing built yet
    assert exporter.get_finished_spans() == ()
    assert processor.force_flush()
    assert len(made) == 2
    life(eager)
    assert _exported(exporter.get_finished_spans()) == _exported(eager_out.get_finished_spans())
    root = exporter.get_finished_spans()[1]
    assert dict(root.attributes or {}) == {"a": 1, "tags": ("x", "y"), "c": 3.5}
    provider.shutdown()


def test_any_other_processor_gets_readable_spans_at_the_end() -> None:
    """One processor that is not a LiteBatchSpanProcessor, even one added later, and every
    processor gets the SDK's ReadableSpan when the span ends."""
    batched, simple = InMemorySpanExporter(), InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(LiteBatchSpanProcessor(batched, schedule_delay_millis=60_000))
    lite = LiteTracer(provider.get_tracer("t"))  # type: ignore[arg-type]
    lite.start_span("before").end()
    provider.add_span_processor(SimpleSpanProcessor(simple))
    lite.start_span("after").end()
    assert [s.name for s in simple.get_finished_spans()] == ["after"]
    assert type(simple.get_finished_spans()[0]) is ReadableSpan
    assert provider.force_flush()
    assert [(s.name, type(s)) for s in batched.get_finished_spans()] == [
        ("before", ReadableSpan),
        ("after", ReadableSpan),
    ]
    provider.shutdown()
