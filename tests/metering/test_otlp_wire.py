"""Our OTLP span encoding is the SDK's, byte for byte, for any spans."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceState

from metering import otlp_wire
from metering.otlp_wire import encode_request

text = st.text(max_size=12)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
scalars = st.one_of(
    st.none(), st.booleans(), text, ints, st.floats(allow_nan=False), st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(text, inner, max_size=3),
    ),
    max_leaves=6,
)
# plain dicts, and the BoundedAttributes the SDK's spans (and ours) hold
attribute_maps = st.dictionaries(text, values, max_size=6)
ids = st.integers(min_value=0, max_value=2**64 - 1)
trace_ids = st.integers(min_value=0, max_value=2**128 - 1)
states = st.one_of(
    st.none(),
    st.just(TraceState()),
    st.just(TraceState([("vendor", "abc"), ("other", "1-2")])),
)


@st.composite
def contexts(draw: st.DrawFn) -> SpanContext:
    return SpanContext(
        draw(trace_ids),
        draw(ids),
        is_remote=draw(st.booleans()),
        trace_flags=draw(st.sampled_from([0, 1])),  # type: ignore[arg-type]
        trace_state=draw(states),
    )


def held(attributes: dict[str, Any], bounded: bool, dropped: int) -> Any:
    if not bounded:
        return attributes
    kept = BoundedAttributes(None, attributes, immutable=True)
    kept.dropped = dropped
    return kept


RESOURCES = [
    Resource({"service.name": "tollway", "host.cores": 2}),
    Resource({"service.name": "other"}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
]
SCOPES = [
    None,
    InstrumentationScope("tollway.metering.telemetry"),
    InstrumentationScope("lib", "1.2", "https://example.com/schema", {"scope.attr": True}),
]


@st.composite
def spans(draw: st.DrawFn) -> ReadableSpan:
    bounded = draw(st.booleans())
    events = [
        Event(draw(text), draw(st.one_of(st.none(), attribute_maps)), draw(ids))
        for _ in range(draw(st.integers(0, 2)))
    ]
    links = [
        Link(draw(contexts()), held(draw(attribute_maps), True, draw(st.integers(0, 300))))
        for _ in range(draw(st.integers(0, 2)))
    ]
    code = draw(st.sampled_from(list(StatusCode)))
    return ReadableSpan(
        name=draw(text),
        context=draw(contexts()),
        parent=draw(st.one_of(st.none(), contexts())),
        resource=draw(st.sampled_from(RESOURCES)),
        attributes=held(draw(attribute_maps), bounded, draw(st.integers(0, 2**20))),
        events=events,
        links=links,
        kind=draw(st.sampled_from(list(SpanKind))),
        status=Status(code, draw(text) if code is StatusCode.ERROR else None),
        start_time=draw(st.one_of(st.none(), ids)),
        end_time=draw(st.one_of(st.none(), ids)),
        instrumentation_scope=draw(st.sampled_from(SCOPES)),
    )


def sdk_bytes(batch: list[ReadableSpan]) -> bytes:
    return encode_spans(batch).SerializePartialToString()  # type: ignore[no-any-return]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(spans(), max_size=5))
def test_the_bytes_are_the_sdk_encoders(batch: list[ReadableSpan]) -> None:
    assert encode_request(batch) == sdk_bytes(batch)


def test_a_repeated_string_attribute_is_spelled_once_and_reused() -> None:
    otlp_wire._pairs.clear()
    first = [make_span(1, {"gen_ai.operation.name": "chat", "tollway.request_id": "r1"})]
    second = [make_span(2, {"gen_ai.operation.name": "chat", "tollway.request_id": "r2"})]
    assert encode_request(first) == sdk_bytes(first)
    assert encode_request(second) == sdk_bytes(second)
    assert set(otlp_wire._pairs) == {
        ("service.name", "tollway"),  # the resource's
        ("gen_ai.operation.name", "chat"),
        ("tollway.request_id", "r1"),
        ("tollway.request_id", "r2"),
    }


def test_kept_strings_are_forgotten_all_at_once_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(otlp_wire, "_PAIRS_KEPT", 3)
    otlp_wire._pairs.clear()
    batch = [make_span(n, {"id": f"r{n}", "op": "chat"}) for n in range(1, 4)]
    assert encode_request(batch) == sdk_bytes(batch)
    assert len(otlp_wire._pairs) <= 3


def test_an_attribute_that_cannot_be_encoded_is_left_out_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attributes = {"fine": 1, "huge": 2**70, "worse": object(), "after": "x"}
    batch = [make_span(1, attributes, bounded=False)]  # BoundedAttributes would drop ``worse``
    with caplog.at_level(logging.ERROR, logger="tollway.telemetry"):
        ours = encode_request(batch)
    assert ours == sdk_bytes(batch)
    message = ExportTraceServiceRequest.FromString(ours)
    (span,) = message.resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in span.attributes] == ["fine", "after"]
    ours_logged = [r for r in caplog.records if r.name == "tollway.telemetry"]
    assert [r.getMessage().split(":")[0] for r in ours_logged] == [
        "Failed to encode key huge",
        "Failed to encode key worse",
    ]


def test_spans_of_two_resources_and_scopes_are_grouped_in_order_of_appearance() -> None:
    a, b = RESOURCES
    batch = [
        make_span(1, {}, a, SCOPES[1]),
        make_span(2, {}, b, SCOPES[1]),
        make_span(3, {}, Resource(dict(a.attributes)), SCOPES[2]),  # equal to ``a``, not it
        make_span(4, {}, a, SCOPES[1]),
    ]
    ours = encode_request(batch)
    assert ours == sdk_bytes(batch)
    message = ExportTraceServiceRequest.FromString(ours)
    assert [[len(s.spans) for s in r.scope_spans] for r in message.resource_spans] == [[2, 1], [1]]


def test_a_spans_attributes_are_read_from_the_dict_inside() -> None:
    # Private SDK fields: if a later SDK renames them, the encoding stays right (the
    # public mapping is read) but slower, and this test says so.
    span = make_span(1, {"a": 1, "b": "two"})
    held = otlp_wire._held_attributes(span)
    assert type(held) is BoundedAttributes
    assert type(otlp_wire._items(held)) is type({}.items())


def test_a_span_it_cannot_spell_raises() -> None:
    with pytest.raises(UnicodeEncodeError):
        encode_request([make_span(1, {}, name="bad \udc80 name")])


def make_span(
    span_id: int,
    attributes: dict[str, Any],
    resource: Resource = RESOURCES[0],
    scope: InstrumentationScope | None = SCOPES[1],
    name: str = "chat auto",
    bounded: bool = True,
) -> ReadableSpan:
    return ReadableSpan(
        name=name,
        context=SpanContext(0xABC, span_id, is_remote=False),
        resource=resource,
        attributes=BoundedAttributes(None, attributes, immutable=True) if bounded else attributes,
        kind=SpanKind.CLIENT,
        start_time=10,
        end_time=20,
        instrumentation_scope=scope,
    )
