"""Root sampling decided once: a dropped root builds nothing yet tells vLLM; a kept one is real."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from metering.report import RequestReport
from metering.sampling import _context_reader, _root_bound
from metering.span_export import DEFAULT_SAMPLE_RATIO, build_provider
from metering.telemetry import Telemetry

UPSTREAM = "http://10.0.0.5:8000/v1/chat/completions"
LOW_64 = (1 << 64) - 1


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def traced(sampler: Sampler) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(provider), exporter


def one_request(telemetry: Telemetry) -> dict[str, str]:
    """A request's span life; the headers its upstream call would carry."""
    span = telemetry.start_request(
        operation="chat", request_model="auto", request_params={"max_tokens": 4}
    )
    with span.child("tollway.route"):
        pass
    sent: dict[str, str] = {}
    with span.upstream(UPSTREAM) as call:
        call.inject_headers(sent)
        call.set_status_code(200)
    span.finish(RequestReport("req-1", "acme", "small", "m", "chat"))
    return sent


def test_a_dropped_root_makes_no_span_but_vllm_learns_the_trace_is_unsampled() -> None:
    telemetry, exporter = traced(ParentBased(ALWAYS_OFF))
    sent = [one_request(telemetry)["traceparent"] for _ in range(3)]
    assert exporter.get_finished_spans() == ()
    for header in sent:
        version, trace_id, span_id, flags = header.split("-")
        assert (version, flags) == ("00", "02")  # not sampled; W3C level 2: random trace id
        assert len(trace_id) == 32
        assert int(trace_id, 16) != 0
        assert len(span_id) == 16
        assert int(span_id, 16) != 0
    assert len(set(sent)) == 3  # a trace of its own each


def test_a_ratio_sampler_keeps_exactly_the_trace_ids_its_rule_keeps() -> None:
    """The decision is made once: a kept root is the SDK span of the same trace id (no p^2)."""
    sampler = ParentBased(TraceIdRatioBased(0.5))
    telemetry, exporter = traced(sampler)
    bound = TraceIdRatioBased(0.5).bound
    outcomes = []
    for _ in range(200):
        exporter.clear()
        _, trace_hex, _, flags = one_request(telemetry)["traceparent"].split("-")
        trace_id = int(trace_hex, 16)
        kept = trace_id & LOW_64 < bound
        assert flags == ("03" if kept else "02")
        roots = [s for s in exporter.get_finished_spans() if s.name == "chat auto"]
        assert [s.context.trace_id for s in roots] == ([trace_id] if kept else [])
        if kept:
            assert {s.name for s in exporter.get_finished_spans()} == {
                "chat auto", "tollway.route", "POST",
            }  # fmt: skip
        outcomes.append(kept)
    assert any(outcomes)
    assert not all(outcomes)


def dropped_headers(telemetry: Telemetry, count: int) -> list[str]:
    headers = []
    for _ in range(count):
        span = telemetry.start_request(operation="chat", request_model="auto")
        sent: dict[str, str] = {}
        with span.upstream(UPSTREAM) as call:
            call.inject_headers(sent)
        headers.append(sent["traceparent"])
    return headers


def test_dropped_traceparents_are_valid_distinct_and_among_the_ids_the_sampler_drops() -> None:
    ratio = TraceIdRatioBased(0.25)
    telemetry, _ = traced(ParentBased(ratio))
    sent = []
    while len(sent) < 700:
        sent += [h for h in dropped_headers(telemetry, 50) if h.endswith("-02")]  # not kept
    assert len(set(sent)) == len(sent)
    for header in sent:
        version, trace_id, span_id, flags = header.split("-")
        assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "02")
        assert int(trace_id, 16) & LOW_64 >= ratio.bound  # what the sampler drops
        assert int(span_id, 16) != 0
    lows = sorted(int(h.split("-")[1], 16) & LOW_64 for h in sent)
    assert lows[0] < ratio.bound + (LOW_64 - ratio.bound) // 10  # spread over all it drops
    assert lows[-1] > LOW_64 - (LOW_64 - ratio.bound) // 10


def test_a_sampler_that_drops_few_ids_still_gets_a_dropped_traceparent_each_time() -> None:
    # 99% kept: a batch of DROPPED_BATCH draws holds about 2.6 ids it drops, often none.
    ratio = TraceIdRatioBased(0.99)
    telemetry, _ = traced(ParentBased(ratio))
    sent = []
    while len(sent) < 40:
        sent += [h for h in dropped_headers(telemetry, 20) if h.endswith("-02")]
    assert len(set(sent)) == len(sent)
    assert all(int(h.split("-")[1], 16) & LOW_64 >= ratio.bound for h in sent)


class Sequence16(RandomIdGenerator):
    """Trace ids from a list, in order: makes each decision predictable."""

    def __init__(self, trace_ids: list[int]):
        self.trace_ids = iter(trace_ids)

    def generate_trace_id(self) -> int:
        return next(self.trace_ids)


def test_the_kept_span_has_the_trace_id_the_decision_was_made_on() -> None:
    half = 1 << 63  # a 0.5 ratio keeps a trace id whose low 64 bits are under this
    ids = [n << 64 | (n if n % 2 == 0 else half + n) for n in range(1, 9)]
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(0.5)),
        id_generator=Sequence16(ids),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(provider)
    sent = [one_request(telemetry)["traceparent"] for _ in range(len(ids))]
    roots = [s.context.trace_id for s in exporter.get_finished_spans() if s.name == "chat auto"]
    kept = [t for t in ids if t & LOW_64 < half]
    assert roots == kept  # one id per request: the SDK was handed the decided one
    assert [int(h.split("-")[1], 16) for h in sent] == ids


class Recording(Sampler):
    """A sampler of another kind: asked through ``should_sample``, keeps odd trace ids."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        self.asked.append(trace_id)
        keep = trace_id % 2 == 1
        return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP, attributes)

    def get_description(self) -> str:
        return "Recording"


def test_another_sampler_is_asked_and_the_sdk_gets_the_same_trace_id() -> None:
    sampler = Recording()
    telemetry, exporter = traced(sampler)
    for _ in range(40):
        one_request(telemetry)
    kept = [a for a in sampler.asked if a % 2]
    roots = [s.context.trace_id for s in exporter.get_finished_spans() if s.name == "chat auto"]
    assert roots
    assert roots == sorted(set(kept), key=kept.index)  # each kept id, once, in order


def test_a_current_span_is_the_parent_as_before() -> None:
    telemetry, exporter = traced(ParentBased(ALWAYS_OFF))
    outer_provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
    outer = outer_provider.get_tracer("test").start_span("outer")
    with trace.use_span(outer, end_on_exit=True):
        sent = one_request(telemetry)
    # ParentBased follows the sampled local parent: recorded, in the parent's trace.
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "chat auto"]
    assert root.context.trace_id == outer.get_span_context().trace_id
    assert sent["traceparent"].split("-")[1] == f"{outer.get_span_context().trace_id:032x}"


def test_the_current_context_is_read_from_the_apis_context_variable() -> None:
    reader = _context_reader()
    assert reader != context.get_current  # the one C call, not the API's two Python calls
    token = context.attach(context.set_value("k", "v"))
    try:
        assert reader() is context.get_current()
        assert reader().get("k") == "v"
    finally:
        context.detach(token)
    assert reader() == {}


def test_default_sampling_is_one_percent_parent_based() -> None:
    provider = build_provider({"OTEL_TRACES_EXPORTER": "console"}, "t", lambda where: None)
    assert provider is not None
    sampler = provider.sampler
    assert isinstance(sampler, ParentBased)
    assert sampler.get_description() == (
        f"ParentBased{{root:TraceIdRatioBased{{{DEFAULT_SAMPLE_RATIO}}},"
        "remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
        "localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler}"
    )
    provider.shutdown()


def test_otel_traces_sampler_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_on"}
    provider = build_provider(env, "t", lambda where: None)
    assert provider is not None
    assert provider.sampler is ALWAYS_ON
    provider.shutdown()


@pytest.mark.parametrize(
    ("name", "bound"),
    [
        ("parentbased_traceidratio", TraceIdRatioBased(0.25).bound),
        ("traceidratio", TraceIdRatioBased(0.25).bound),
        ("always_off", 0),
        ("parentbased_always_off", 0),
        ("always_on", LOW_64 + 1),
        ("parentbased_always_on", LOW_64 + 1),
    ],
)
def test_samplers_named_by_otel_traces_sampler_are_decided_by_their_rule(
    monkeypatch: pytest.MonkeyPatch, name: str, bound: int
) -> None:
    # The SDK builds some of these as its own subclasses (ParentBasedTraceIdRatio...):
    # a dropped root must still cost no SDK call, whichever way sampling was configured.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    sampler = TracerProvider(shutdown_on_exit=False).sampler
    assert _root_bound(sampler) == bound


def test_a_sampler_subclassed_by_someone_else_is_asked() -> None:
    class Mine(TraceIdRatioBased):
        pass

    assert _root_bound(Mine(0.5)) is None
    assert _root_bound(ParentBased(Mine(0.5))) is None


@pytest.mark.parametrize(
    "sampler",
    [
        ParentBased(TraceIdRatioBased(1.0)),
        TraceIdRatioBased(1.0),
        ALWAYS_ON,
        ParentBased(ALWAYS_ON),
    ],
)
def test_a_kept_root_is_the_span_the_sdk_would_start(sampler: Sampler) -> None:
    """A root the rule kept is made without asking the sampler again, as the SDK makes it."""
    telemetry, _ = traced(sampler)
    roots, tracer = telemetry._roots, telemetry._tracer
    assert roots is not None
    assert roots._bound is not None  # the rule applies to this sampler
    attributes = {"gen_ai.operation.name": "chat", "n": 1}
    assert roots.presample() is False  # kept: its trace id is handed to the id generator
    handed = roots._ids._next
    fast = roots.start("chat auto", SpanKind.CLIENT, attributes)
    roots._ids.hand(handed)
    slow = tracer.start_span("chat auto", None, SpanKind.CLIENT, attributes)  # type: ignore[union-attr]
    for span in (fast, slow):
        assert span.get_span_context().trace_id == handed
    a, b = fast.get_span_context(), slow.get_span_context()
    assert (a.trace_flags, a.trace_state) == (b.trace_flags, b.trace_state)
    assert a.is_remote is b.is_remote is False
    assert a.trace_flags.sampled
    assert a.trace_flags.random_trace_id
    for name in ("name", "kind", "parent", "attributes"):
        assert getattr(fast, name) == getattr(slow, name), name
