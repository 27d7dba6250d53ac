"""Request spans: GenAI attributes, parent/child structure, propagation, opt-in content, no-op."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from metering.money import to_nanos, usd
from metering.pricing import NO_COST, Cost
from metering.report import RequestReport
from metering.telemetry import Content, RequestSpan, Telemetry, request_attributes
from metering.usage import TokenUsage
from tests.support.otlp_collector import Collector, running_collector

W3C = TraceContextTextMapPropagator()
UPSTREAM = "http://10.0.0.5:8000/v1/chat/completions"
CLIENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "rainy, 14C"},
]
CHOICES = [{"index": 0, "message": {"role": "assistant", "content": "Rainy, 14C."}}]


class Spans:
    def __init__(self, telemetry: Telemetry, exporter: InMemorySpanExporter):
        self.telemetry = telemetry
        self.exporter = exporter

    def finished(self) -> dict[str, ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        by_name = {span.name: span for span in spans}
        assert len(by_name) == len(spans)
        return by_name


def make_spans(record_content: bool = False, failures: list[str] | None = None) -> Spans:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clock = itertools.count(100.0, 0.25).__next__  # request start, first chunk...
    hook = failures.append if failures is not None else None
    return Spans(
        Telemetry(provider, record_content=record_content, on_failure=hook, clock=clock), exporter
    )


@pytest.fixture
def spans() -> Spans:
    return make_spans()


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def thaw(value: object) -> object:
    """An attribute value as plain lists and dicts (the SDK stores tuples and read-only maps)."""
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    return value


def make_report(**changes: Any) -> RequestReport:
    report = RequestReport(
        request_id="req-1",
        tenant="acme",
        tier="small",
        model="qwen2.5-1.5b-instruct",
        operation="chat",
        usage=TokenUsage(prompt_tokens=120, completion_tokens=30, cached_prompt_tokens=64),
        gpu_us=500_000,
        cost=Cost.of_usd(usd("0.000250000"), usd("0.000400000")),
        replica="http://10.0.0.5:8000",
        attempts=1,
        status=200,
        finish_reasons=("stop",),
        response_id="chatcmpl-1",
    )
    return report._replace(**changes)


def run_lifecycle(
    telemetry: Telemetry,
    report: RequestReport,
    *,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    upstream_status: int | None = 200,
    content: Content | None = None,
) -> dict[str, str]:
    """What the gateway does for one request; returns the headers sent upstream."""
    span = telemetry.start_request(
        operation=report.operation,
        request_model="auto",
        request_params=params if params is not None else {"model": "auto", "max_tokens": 64},
        parent_headers=headers,
    )
    with span.child("tollway.route"):
        span.set_route(report.tier, 0.31, "score below threshold")
    with span.child("tollway.cache_lookup") as lookup:
        lookup.set_attribute("tollway.cache", report.cache)
    upstream_headers = {"content-type": "application/json"}
    if upstream_status is not None:
        with span.child("tollway.queue_wait"):
            pass
        with span.upstream(UPSTREAM) as call:
            span.inject_headers(upstream_headers)
            call.set_status_code(upstream_status)
        span.mark_first_chunk()
    span.finish(
        report,
        server_address="10.0.0.5" if upstream_status is not None else None,
        server_port=8000 if upstream_status is not None else None,
        content=content,
    )
    return upstream_headers


def common(**extra: Any) -> dict[str, Any]:
    """Attributes every span of `make_report()` carries, plus `extra`."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "auto",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.response.model": "qwen2.5-1.5b-instruct",
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.usage.cache_read.input_tokens": 64,
        "gen_ai.usage.cost.amount": 0.00025,
        "gen_ai.usage.cost.currency": "USD",
        "gen_ai.usage.cost.source": "local",
        "server.address": "10.0.0.5",
        "server.port": 8000,
        "tollway.request_id": "req-1",
        "tollway.tenant": "acme",
        "tollway.tier": "small",
        "tollway.route.score": 0.31,
        "tollway.route.reason": "score below threshold",
        "tollway.cache": "miss",
        "tollway.gpu_seconds": 0.5,
        "tollway.cost.loaded_usd": 0.0004,
        "tollway.replica": "http://10.0.0.5:8000",
        "tollway.attempts": 1,
        "gen_ai.response.time_to_first_chunk": 0.25,
    }
    attributes.update(extra)
    return {key: value for key, value in attributes.items() if value is not None}


def test_success_span_tree_and_attributes(spans: Spans) -> None:
    sent = run_lifecycle(spans.telemetry, make_report())

    by_name = spans.finished()
    assert sorted(by_name) == [
        "POST",
        "chat auto",
        "tollway.cache_lookup",
        "tollway.queue_wait",
        "tollway.route",
    ]
    root = by_name["chat auto"]
    assert root.kind is SpanKind.CLIENT
    assert root.status.status_code is StatusCode.UNSET
    assert root.parent is None
    assert dict(root.attributes or {}) == common()
    for name, span in by_name.items():
        if name != "chat auto":
            assert span.context.trace_id == root.context.trace_id
            assert span.parent is not None
            assert span.parent.span_id == root.context.span_id
            assert span.kind is (SpanKind.CLIENT if name == "POST" else SpanKind.INTERNAL)
            assert span.status.status_code is StatusCode.UNSET
    assert dict(by_name["tollway.cache_lookup"].attributes or {}) == {"tollway.cache": "miss"}
    assert dict(by_name["tollway.route"].attributes or {}) == {}

    post = by_name["POST"]
    assert dict(post.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": "10.0.0.5",
        "server.port": 8000,
        "url.full": UPSTREAM,
        "http.response.status_code": 200,
    }
    flags = post.context.trace_flags  # sampled, and (W3C level 2) a random trace id
    assert flags.sampled
    assert sent == {
        "content-type": "application/json",
        "traceparent": f"00-{root.context.trace_id:032x}-{post.context.span_id:016x}-{flags:02x}",
    }


def test_incoming_traceparent_becomes_the_parent(spans: Spans) -> None:
    incoming = {"traceparent": f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"}
    sent = run_lifecycle(spans.telemetry, make_report(), headers=incoming)

    by_name = spans.finished()
    root = by_name["chat auto"]
    assert root.parent is not None
    assert root.parent.is_remote
    assert (root.parent.trace_id, root.parent.span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert {span.context.trace_id for span in by_name.values()} == {CLIENT_TRACE}
    assert sent["traceparent"].startswith(f"00-{CLIENT_TRACE:032x}-")


def test_the_clients_tracestate_goes_to_vllm_as_the_w3c_propagator_writes_it(
    spans: Spans,
) -> None:
    incoming = {
        "traceparent": f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01",
        "tracestate": "vendor=abc,other=1-2",
    }
    sent = run_lifecycle(spans.telemetry, make_report(), headers=incoming)

    post = spans.finished()["POST"]
    expected: dict[str, str] = {}
    W3C.inject(expected, trace.set_span_in_context(NonRecordingSpan(post.context)))
    assert expected["tracestate"] == "vendor=abc,other=1-2"
    assert sent == {"content-type": "application/json", **expected}


def test_an_unsampled_client_trace_records_nothing_but_propagates(spans: Spans) -> None:
    incoming = {"traceparent": f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-00"}
    sent = run_lifecycle(spans.telemetry, make_report(), headers=incoming)

    assert spans.exporter.get_finished_spans() == ()
    version, trace_id, _, flags = sent["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", f"{CLIENT_TRACE:032x}", "00")


def test_headers_without_a_valid_traceparent_start_a_new_trace(spans: Spans) -> None:
    other = make_spans()
    run_lifecycle(spans.telemetry, make_report(), headers={"traceparent": "garbage"})
    run_lifecycle(other.telemetry, make_report(), headers={"user-agent": "x"})
    assert spans.finished()["chat auto"].parent is None
    assert other.finished()["chat auto"].parent is None


def test_streamed_request(spans: Spans) -> None:
    params = {
        "model": "auto",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": 42,
        "stop": "\n\n",
    }
    report = make_report(finish_reasons=("length",), usage=TokenUsage(120, 256))
    run_lifecycle(spans.telemetry, report, params=params)

    assert dict(spans.finished()["chat auto"].attributes or {}) == common(
        **{
            "gen_ai.request.max_tokens": 256,
            "gen_ai.request.stream": True,
            "gen_ai.request.temperature": 0.7,
            "gen_ai.request.top_p": 0.95,
            "gen_ai.request.seed": 42,
            "gen_ai.request.stop_sequences": ("\n\n",),
            "gen_ai.response.finish_reasons": ("length",),
            "gen_ai.usage.output_tokens": 256,
            "gen_ai.usage.cache_read.input_tokens": None,
        }
    )


def test_cache_hit_costs_nothing_and_names_no_server(spans: Spans) -> None:
    report = make_report(
        cost=NO_COST,
        gpu_us=0,
        cache="hit",
        saved_nanos=to_nanos(usd("0.000250000")),
        replica="",
        attempts=0,
        usage=TokenUsage(120, 30),
    )
    sent = run_lifecycle(spans.telemetry, report, upstream_status=None)

    by_name = spans.finished()
    assert sorted(by_name) == ["chat auto", "tollway.cache_lookup", "tollway.route"]
    assert sent == {"content-type": "application/json"}
    assert dict(by_name["chat auto"].attributes or {}) == common(
        **{
            "gen_ai.usage.cost.amount": 0.0,
            "gen_ai.usage.cache_read.input_tokens": None,
            "tollway.cache": "hit",
            "tollway.gpu_seconds": 0.0,
            "tollway.cost.loaded_usd": 0.0,
            "tollway.cost.saved_usd": 0.00025,
            "tollway.replica": None,
            "tollway.attempts": 0,
            "server.address": None,
            "server.port": None,
            "gen_ai.response.time_to_first_chunk": None,
        }
    )
    assert dict(by_name["tollway.cache_lookup"].attributes or {}) == {"tollway.cache": "hit"}


def test_failure_sets_error_type_and_status(spans: Spans) -> None:
    report = make_report(
        status=502,
        error_type="upstream_unavailable",
        finish_reasons=(),
        response_id=None,
        usage=TokenUsage(),
        cost=NO_COST,
        gpu_us=0,
        attempts=3,
    )
    run_lifecycle(spans.telemetry, report, upstream_status=503)

    by_name = spans.finished()
    root = by_name["chat auto"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == "upstream_unavailable"
    assert dict(root.attributes or {}) == common(
        **{
            "error.type": "upstream_unavailable",
            "gen_ai.response.id": None,
            "gen_ai.response.finish_reasons": ("error",),
            "gen_ai.usage.input_tokens": 0,
            "gen_ai.usage.output_tokens": 0,
            "gen_ai.usage.cache_read.input_tokens": None,
            "gen_ai.usage.cost.amount": 0.0,
            "tollway.gpu_seconds": 0.0,
            "tollway.cost.loaded_usd": 0.0,
            "tollway.attempts": 3,
        }
    )
    post = by_name["POST"]
    assert post.status.status_code is StatusCode.ERROR
    assert post.attributes is not None
    assert (post.attributes["error.type"], post.attributes["http.response.status_code"]) == (
        "503",
        503,
    )


def test_client_error_status_is_the_error_type(spans: Spans) -> None:
    report = make_report(status=429, finish_reasons=(), response_id=None, usage=TokenUsage())
    run_lifecycle(spans.telemetry, report, upstream_status=None)

    root = spans.finished()["chat auto"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes is not None
    assert root.attributes["error.type"] == "429"
    assert root.attributes["gen_ai.response.finish_reasons"] == ("error",)


def test_retry_attempts_are_separate_http_spans(spans: Spans) -> None:
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    headers: list[dict[str, str]] = []
    for attempt, status in enumerate([503, 200]):
        with span.upstream(UPSTREAM, attempt=attempt) as call:
            headers.append({})
            call.inject_headers(headers[-1])
            call.set_status_code(status)
    span.finish(make_report())

    posts = [s for s in spans.exporter.get_finished_spans() if s.name == "POST"]
    assert [(s.attributes or {}).get("http.request.resend_count") for s in posts] == [None, 1]
    assert [h["traceparent"].split("-")[2] for h in headers] == [
        f"{s.context.span_id:016x}" for s in posts
    ]


def test_an_exception_fails_the_step_and_propagates(spans: Spans) -> None:
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    with pytest.raises(TimeoutError), span.child("tollway.queue_wait"):
        raise TimeoutError
    with pytest.raises(RuntimeError), span:
        raise RuntimeError("boom")
    with spans.telemetry.start_request(operation="chat", request_model="plain"):
        pass  # ended unreported, not failed

    by_name = spans.finished()
    wait = by_name["tollway.queue_wait"]
    assert wait.status.status_code is StatusCode.ERROR
    assert dict(wait.attributes or {}) == {"error.type": "TimeoutError"}
    root = by_name["chat auto"]
    assert root.status.status_code is StatusCode.ERROR
    assert (root.attributes or {})["error.type"] == "RuntimeError"
    assert by_name["chat plain"].status.status_code is StatusCode.UNSET


def test_finish_happens_once(spans: Spans) -> None:
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    span.finish(make_report())
    span.finish(make_report(status=500, error_type="late"))
    span.fail("later")

    (root,) = spans.exporter.get_finished_spans()
    assert root.status.status_code is StatusCode.UNSET
    assert "error.type" not in (root.attributes or {})


def test_a_sampled_request_is_traced_and_open_until_finished(spans: Spans) -> None:
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    assert (span.traced, span.open) == (True, True)
    span.finish(make_report())
    assert (span.traced, span.open) == (True, False)


def test_no_span_is_ever_made_current(spans: Spans) -> None:
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    with span.child("tollway.route"), span.upstream(UPSTREAM):
        assert trace.get_current_span() is trace.INVALID_SPAN
    span.finish(make_report())
    assert len(spans.exporter.get_finished_spans()) == 3


def test_a_traceparent_in_raw_asgi_header_lines_is_joined(spans: Spans) -> None:
    raw = [
        (b"host", b"gateway"),
        (b"traceparent", f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01".encode()),
        (b"tracestate", b"vendor=abc"),
    ]
    span = spans.telemetry.start_request(operation="chat", request_model="auto", parent_headers=raw)
    sent: dict[str, str] = {}
    span.inject_headers(sent)
    span.finish(make_report())

    (root,) = spans.exporter.get_finished_spans()
    assert root.parent is not None
    assert (root.parent.trace_id, root.parent.span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert sent == {
        "traceparent": f"00-{CLIENT_TRACE:032x}-{root.context.span_id:016x}-01",
        "tracestate": "vendor=abc",
    }


def test_content_is_not_recorded_by_default(spans: Spans) -> None:
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    assert not span.wants_content
    span.finish(make_report(), content=Content(CHAT, CHOICES))

    attributes = dict(spans.finished()["chat auto"].attributes or {})
    assert not any("messages" in key for key in attributes)
    assert "Paris" not in repr(attributes)


def test_chat_content_is_recorded_on_opt_in() -> None:
    spans = make_spans(record_content=True)
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    assert span.wants_content
    span.finish(make_report(), content=Content(CHAT, CHOICES))

    attributes = dict(spans.finished()["chat auto"].attributes or {})
    assert thaw(attributes.pop("gen_ai.input.messages")) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "parts": [
                {
                    "type": "tool_call",
                    "id": "call_1",
                    "name": "weather",
                    "arguments": '{"city":"Paris"}',
                }
            ],
        },
        {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy, 14C"}],
        },
    ]
    assert thaw(attributes.pop("gen_ai.output.messages")) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Rainy, 14C."}]}
    ]
    assert attributes == common(
        **{
            "gen_ai.request.max_tokens": None,
            "tollway.route.score": None,
            "tollway.route.reason": None,
            "server.address": None,
            "server.port": None,
            "gen_ai.response.time_to_first_chunk": None,
        }
    )


def test_text_completion_content_is_recorded_on_opt_in() -> None:
    spans = make_spans(record_content=True)
    span = spans.telemetry.start_request(operation="text_completion", request_model="small")
    span.finish(
        make_report(operation="text_completion"),
        content=Content("Once upon", [{"index": 0, "text": " a time"}]),
    )

    (root,) = spans.exporter.get_finished_spans()
    assert root.name == "text_completion small"
    assert root.attributes is not None
    assert thaw(root.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Once upon"}]}
    ]
    assert thaw(root.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": " a time"}]}
    ]


def test_telemetry_failures_are_counted_never_raised() -> None:
    failures: list[str] = []
    spans = make_spans(record_content=True, failures=failures)
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    broken = make_report()._replace(cost=None)
    span.finish(broken, content=Content(CHAT, CHOICES))

    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    span.finish(make_report(), content=Content(CHAT, [None]))  # type: ignore[list-item]

    first, second = spans.exporter.get_finished_spans()
    assert failures == ["finish", "content"]
    assert first.end_time is not None  # ended all the same
    assert (second.attributes or {})["gen_ai.usage.input_tokens"] == 120


def test_a_failing_hook_is_contained() -> None:
    def hook(where: str) -> None:
        raise RuntimeError(where)

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = Telemetry(provider, on_failure=hook).start_request(
        operation="chat", request_model="auto"
    )
    broken = make_report()._replace(usage=None)
    span.finish(broken)
    assert len(exporter.get_finished_spans()) == 1


def test_disabled_telemetry_is_inert() -> None:
    telemetry = Telemetry()
    span = telemetry.start_request(
        operation="chat",
        request_model="auto",
        request_params={"max_tokens": 1},
        parent_headers={"traceparent": f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"},
    )
    assert not telemetry.enabled
    assert (span.traced, span.open, span.wants_content) == (False, False, False)
    sent = run_lifecycle(telemetry, make_report())
    assert sent == {"content-type": "application/json"}
    with span.child("tollway.route") as step:
        step.set_error("x")
    span.finish(make_report())
    telemetry.shutdown()


def test_request_params_map_to_conventions() -> None:
    assert request_attributes(
        {
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": 1,
            "top_p": True,  # a bool is not a number here
            "seed": "7",
            "top_k": -1,
            "n": 2,
            "stop": ["a", "b"],
            "response_format": {"type": "json_schema"},
            "reasoning_effort": "low",
            "stream": False,
        }
    ) == {
        "gen_ai.request.max_tokens": 20,
        "gen_ai.request.temperature": 1.0,
        "gen_ai.request.choice.count": 2,
        "gen_ai.request.stop_sequences": ["a", "b"],
        "gen_ai.output.type": "json",
        "gen_ai.request.reasoning.level": "low",
    }
    assert request_attributes({"top_k": 40, "presence_penalty": 0.5}) == {
        "gen_ai.request.top_k": 40,
        "gen_ai.request.presence_penalty": 0.5,
    }


def test_from_env_without_config_is_a_no_op() -> None:
    before = threading.active_count()
    telemetry = Telemetry.from_env()
    span = telemetry.start_request(operation="chat", request_model="auto")
    assert isinstance(span, RequestSpan)
    assert not telemetry.enabled
    assert threading.active_count() == before
    telemetry.shutdown()


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_SDK_DISABLED": "true"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "jaeger"},
    ],
)
def test_from_env_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = threading.active_count()
    assert not Telemetry.from_env().enabled
    assert threading.active_count() == before


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_from_env_exports_otlp_and_survives_a_dead_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")  # default samples 1%
    failures: list[str] = []
    telemetry = Telemetry.from_env(service_name="tollway-test", on_failure=failures.append)
    assert telemetry.enabled
    provider = telemetry._provider
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "tollway-test"

    sent = run_lifecycle(telemetry, make_report())
    assert "traceparent" in sent
    started = time.monotonic()
    telemetry.shutdown()  # flushes into the closed port: fails, is counted, returns
    assert time.monotonic() - started < 2.0
    assert failures  # one per failed batch
    assert set(failures) == {"export"}
    assert not telemetry.enabled
    assert run_lifecycle(telemetry, make_report()) == {"content-type": "application/json"}


@pytest.fixture
def collector() -> Iterator[Collector]:
    with running_collector() as collector:
        yield collector


def otlp_attributes(span: Any) -> dict[str, Any]:
    """An OTLP span's attributes as plain values (arrays of strings as lists)."""
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [v.string_value for v in kv.value.array_value.values]
        else:
            out[kv.key] = getattr(kv.value, kind)
    return out


def test_from_env_exports_what_the_collector_decodes(
    monkeypatch: pytest.MonkeyPatch, collector: Collector
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    failures: list[str] = []
    telemetry = Telemetry.from_env(service_name="tollway-test", on_failure=failures.append)
    incoming = {"traceparent": f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"}
    sent = run_lifecycle(telemetry, make_report(), headers=incoming)
    telemetry.shutdown()  # flushes the batch

    assert failures == []
    assert len(collector.bodies) == 1
    by_name = {span.name: span for span in collector.spans}
    assert sorted(by_name) == [
        "POST",
        "chat auto",
        "tollway.cache_lookup",
        "tollway.queue_wait",
        "tollway.route",
    ]
    root, post = by_name["chat auto"], by_name["POST"]
    assert (root.trace_id.hex(), root.parent_span_id.hex()) == (
        f"{CLIENT_TRACE:032x}",
        f"{CLIENT_SPAN:016x}",
    )
    attributes = otlp_attributes(root)
    assert 0 < attributes.pop("gen_ai.response.time_to_first_chunk") < 5  # a real clock
    assert attributes == {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in common(**{"gen_ai.response.time_to_first_chunk": None}).items()
    }
    assert otlp_attributes(post) == {
        "http.request.method": "POST",
        "server.address": "10.0.0.5",
        "server.port": 8000,
        "url.full": UPSTREAM,
        "http.response.status_code": 200,
    }
    assert sent["traceparent"] == f"00-{CLIENT_TRACE:032x}-{post.span_id.hex()}-01"
    assert {s.parent_span_id for s in collector.spans if s.name != "chat auto"} == {root.span_id}


def test_a_batch_the_collector_refuses_is_counted(
    monkeypatch: pytest.MonkeyPatch, collector: Collector
) -> None:
    collector.status = 400  # not retried
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    failures: list[str] = []
    telemetry = Telemetry.from_env(on_failure=failures.append)
    run_lifecycle(telemetry, make_report())
    telemetry.shutdown()
    assert len(collector.bodies) == 1
    assert failures == ["export"]


def test_service_name_from_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gateway")
    telemetry = Telemetry.from_env()
    provider = telemetry._provider
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "edge-gateway"
    telemetry.shutdown()


def test_cost_amount_is_the_marginal_dollars() -> None:
    spans = make_spans()
    cost = Cost.of_usd(Decimal("0.000000123"), Decimal("0.000000200"))
    span = spans.telemetry.start_request(operation="chat", request_model="auto")
    span.finish(make_report(cost=cost))
    (root,) = spans.exporter.get_finished_spans()
    assert root.attributes is not None
    assert root.attributes["gen_ai.usage.cost.amount"] == 1.23e-07
    assert root.attributes["tollway.cost.loaded_usd"] == 2e-07
