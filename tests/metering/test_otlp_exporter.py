"""The OTLP/HTTP exporter with our encoder, against a real collector on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import trace_exporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from metering import otlp_exporter
from metering.otlp_exporter import WireSpanExporter
from metering.telemetry import Telemetry
from tests.metering.test_telemetry import make_report, run_lifecycle
from tests.support.otlp_collector import Collector, running_collector


@pytest.fixture
def collector() -> Iterator[Collector]:
    with running_collector() as collector:
        yield collector


def request_spans() -> list[ReadableSpan]:
    """The five spans of one traced request, as the gateway makes them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    run_lifecycle(Telemetry(provider), make_report())
    spans = list(exporter.get_finished_spans())
    assert len(spans) == 5
    return spans


def sdk_bytes(spans: list[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializePartialToString()  # type: ignore[no-any-return]


def test_exports_our_encoding_without_the_sdks_encoder(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = request_spans()
    expected = sdk_bytes(spans)

    def refuse(spans: Any) -> Any:
        raise AssertionError("the SDK's encoder was used")

    # If a later SDK renames the fields the fast path reads, export falls back to
    # the SDK's encoder: this test then fails instead of the gateway slowing quietly.
    monkeypatch.setattr(trace_exporter, "encode_spans", refuse)
    exporter = WireSpanExporter(endpoint=collector.traces_url)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert collector.bodies == [expected]
    names = {s.name for s in ExportTraceServiceRequest.FromString(expected)
             .resource_spans[0].scope_spans[0].spans}  # fmt: skip
    assert names == {"chat auto", "tollway.route", "tollway.cache_lookup",
                     "tollway.queue_wait", "POST"}  # fmt: skip
    exporter.shutdown()


def test_a_batch_it_cannot_encode_goes_through_the_sdks_encoder(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = request_spans()

    def broken(spans: Any) -> bytes:
        raise ValueError("cannot spell this")

    monkeypatch.setattr(otlp_exporter, "encode_request", broken)
    exporter = WireSpanExporter(endpoint=collector.traces_url)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert collector.bodies == [sdk_bytes(spans)]
    exporter.shutdown()


def test_a_refused_batch_is_a_failure(collector: Collector) -> None:
    collector.status = 400  # not retried
    exporter = WireSpanExporter(endpoint=collector.traces_url)
    assert exporter.export(request_spans()) is SpanExportResult.FAILURE
    assert len(collector.bodies) == 1
    exporter.shutdown()


def test_a_batch_over_the_size_limit_is_dropped_as_the_sdk_drops_it(collector: Collector) -> None:
    exporter = WireSpanExporter(endpoint=collector.traces_url, max_request_size=100)
    assert exporter.export(request_spans()) is SpanExportResult.FAILURE
    assert collector.bodies == []
    exporter.shutdown()


def test_after_shutdown_nothing_is_sent(collector: Collector) -> None:
    exporter = WireSpanExporter(endpoint=collector.traces_url)
    exporter.shutdown()
    assert exporter.export(request_spans()) is SpanExportResult.FAILURE
    assert collector.bodies == []
