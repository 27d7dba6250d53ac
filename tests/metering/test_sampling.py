"""Sampling at the root: 1% parent-based by default, ``OTEL_TRACES_SAMPLER`` honoured, and a
sampled-out request holds only a non-recording span that still tells vLLM so."""

from __future__ import annotations

import os

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from metering.report import RequestReport
from metering.span_export import DEFAULT_SAMPLE_RATIO, build_provider, default_sampler
from metering.telemetry import ParentHeaders, Telemetry

UPSTREAM = "http://10.0.0.5:8000/v1/chat/completions"
LOW_64 = (1 << 64) - 1
CLIENT_SPAN = 0x00F067AA0BA902B7


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def traced(sampler: Sampler | None) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(provider), exporter


def one_request(telemetry: Telemetry, headers: ParentHeaders | None = None) -> dict[str, str]:
    """A request's span life; the headers its upstream call would carry."""
    span = telemetry.start_request(
        operation="chat",
        request_model="auto",
        request_params={"max_tokens": 4},
        parent_headers=headers,
    )
    with span.child("tollway.route"):
        pass
    sent: dict[str, str] = {}
    with span.upstream(UPSTREAM) as call:
        call.inject_headers(sent)
        call.set_status_code(200)
    span.finish(RequestReport("req-1", "acme", "small", "m", "chat"))
    return sent


def test_the_default_is_one_percent_of_roots_parent_based(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = build_provider("t", lambda where: None)
    assert provider is not None
    assert provider.sampler.get_description() == (
        f"ParentBased{{root:TraceIdRatioBased{{{DEFAULT_SAMPLE_RATIO}}},"
        "remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
        "localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler}"
    )
    provider.shutdown()


def test_about_one_root_in_a_hundred_is_traced_by_default() -> None:
    telemetry, exporter = traced(default_sampler(os.environ))
    spans = [telemetry.start_request(operation="chat", request_model="auto") for _ in range(5000)]
    for span in spans:
        span.fail("x")
    traced_count = sum(span.traced for span in spans)
    assert 20 <= traced_count <= 90  # 50 expected; this band is over four deviations wide
    assert len(exporter.get_finished_spans()) == traced_count


@pytest.mark.parametrize(
    ("name", "arg", "description"),
    [
        ("always_on", None, "AlwaysOnSampler"),
        ("traceidratio", "0.25", "TraceIdRatioBased{0.25}"),
        ("parentbased_traceidratio", "0.5", "ParentBased{root:TraceIdRatioBased{0.5},"),
    ],
)
def test_otel_traces_sampler_wins(
    monkeypatch: pytest.MonkeyPatch, name: str, arg: str | None, description: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    provider = build_provider("t", lambda where: None)
    assert provider is not None
    assert provider.sampler.get_description().startswith(description)
    provider.shutdown()


def test_a_sampled_out_root_records_nothing_and_tells_vllm_it_is_unsampled() -> None:
    telemetry, exporter = traced(ParentBased(ALWAYS_OFF))
    span = telemetry.start_request(operation="chat", request_model="auto")
    assert (span.traced, span.open, span.wants_content) == (False, False, False)
    span.finish(RequestReport("req-1", "acme", "small", "m", "chat"))

    sent = [one_request(telemetry)["traceparent"] for _ in range(3)]
    assert exporter.get_finished_spans() == ()
    for header in sent:
        version, trace_id, span_id, flags = header.split("-")
        assert (version, flags) == ("00", "02")  # not sampled; W3C level 2: random trace id
        assert int(trace_id, 16) != 0
        assert int(span_id, 16) != 0
    assert len({h.split("-")[1] for h in sent}) == 3  # a trace of its own each


def test_a_ratio_decides_once_at_the_root_and_the_children_follow() -> None:
    telemetry, exporter = traced(ParentBased(TraceIdRatioBased(0.5)))
    bound = TraceIdRatioBased(0.5).bound
    outcomes = []
    for _ in range(200):
        exporter.clear()
        _, trace_hex, _, flags = one_request(telemetry)["traceparent"].split("-")
        trace_id = int(trace_hex, 16)
        kept = trace_id & LOW_64 < bound  # the ratio sampler's rule
        assert flags == ("03" if kept else "02")
        finished = exporter.get_finished_spans()
        assert {s.name for s in finished} == (
            {"chat auto", "tollway.route", "POST"} if kept else set()
        )
        assert {s.context.trace_id for s in finished} <= {trace_id}
        outcomes.append(kept)
    assert any(outcomes)
    assert not all(outcomes)


@pytest.mark.parametrize("raw", [False, True])
def test_a_clients_sampled_traceparent_is_always_traced(raw: bool) -> None:
    telemetry, exporter = traced(default_sampler(os.environ))
    for n in range(20):
        trace_id = n << 64 | LOW_64  # low bits the 1% root rule would drop
        header = f"00-{trace_id:032x}-{CLIENT_SPAN:016x}-01"
        headers: ParentHeaders = (
            [(b"host", b"gw"), (b"TraceParent", header.encode())]
            if raw
            else {"traceparent": header}
        )
        sent = one_request(telemetry, headers)
        assert sent["traceparent"].startswith(f"00-{trace_id:032x}-")
        assert sent["traceparent"].endswith("-01")
    roots = [s for s in exporter.get_finished_spans() if s.name == "chat auto"]
    assert len(roots) == 20
    assert all(s.parent is not None and s.parent.span_id == CLIENT_SPAN for s in roots)


def test_a_clients_unsampled_traceparent_is_never_traced() -> None:
    telemetry, exporter = traced(ParentBased(ALWAYS_ON))
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    sent = one_request(telemetry, {"traceparent": f"00-{trace_id:032x}-{CLIENT_SPAN:016x}-00"})
    assert exporter.get_finished_spans() == ()
    assert sent["traceparent"].startswith(f"00-{trace_id:032x}-")
    assert sent["traceparent"].endswith("-00")


def test_a_current_span_is_the_parent() -> None:
    telemetry, exporter = traced(ParentBased(ALWAYS_OFF))
    outer = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False).get_tracer("t")
    with outer.start_as_current_span("outer") as parent:
        sent = one_request(telemetry)
    # ParentBased follows the sampled local parent: recorded, in the parent's trace.
    trace_id = parent.get_span_context().trace_id
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "chat auto"]
    assert root.context.trace_id == trace_id
    assert sent["traceparent"].split("-")[1] == f"{trace_id:032x}"
