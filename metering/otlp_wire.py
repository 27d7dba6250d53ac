"""Finished spans as an OTLP ``ExportTraceServiceRequest``, written straight to protobuf bytes.

The SDK's OTLP exporter builds a protobuf message object for every span,
every attribute and every value, groups the spans by hashing each one's
``Resource`` (a JSON dump of its attributes, per span), then serializes the
lot: about 365 us per traced request (a root and four children) on this
machine, in the exporter's thread but on the gateway's CPU, more than the
rest of a traced request's spans put together (bench/RESULTS.md, 2026-11-23,
session 8). ``encode_request`` writes the same message's wire bytes
directly, field by field, from the same ``ReadableSpan``s; an attribute's
key is spelled once and kept.

It is the SDK's encoder to the message: the same fields, the same presence
(a span's ``status`` and each ``KeyValue``'s ``value`` are always present,
an attribute whose value cannot be encoded is left out and logged, as the
SDK does), the same grouping by resource and instrumentation scope in order
of first appearance, the same field order: tests/metering/test_otlp_wire.py
compares both encoders' bytes for random spans (hypothesis). Anything it
cannot spell (a span name that is not UTF-8, an id out of range) raises, and
the exporter then uses the SDK's own encoder for that batch
(``metering.otlp_exporter``).

Wire format: https://protobuf.dev/programming-guides/encoding/; the fields
are opentelemetry-proto's ``trace/v1/trace.proto`` and
``common/v1/common.proto``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from struct import Struct
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.util.types import Attributes

log = logging.getLogger("tollway.telemetry")

_FIXED64 = Struct("<Q").pack
_FIXED32 = Struct("<I").pack
_DOUBLE = Struct("<d").pack
_BYTE = [bytes((n,)) for n in range(0x80)]
_INT64 = 1 << 63
_UINT64 = (1 << 64) - 1
_KEYS_KEPT = 4096  # distinct attribute keys spelled and kept; past that, spelled each time
_PAIRS_KEPT = 4096  # string attributes kept whole (``_attributes``)
# Span.SpanKind's numbers (trace.proto)
_KIND = {
    SpanKind.INTERNAL: b"\x30\x01",
    SpanKind.SERVER: b"\x30\x02",
    SpanKind.CLIENT: b"\x30\x03",
    SpanKind.PRODUCER: b"\x30\x04",
    SpanKind.CONSUMER: b"\x30\x05",
}
_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def _varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a message): tag, length, payload."""
    n = len(payload)
    return tag + (_BYTE[n] if n < 0x80 else _varint(n)) + payload


class _Keys(dict[str, bytes]):
    """An attribute key as ``KeyValue``'s field 1, spelled once per key."""

    def __missing__(self, key: str) -> bytes:
        spelled = _field(b"\x0a", key.encode()) if key else b""  # proto3: "" is not written
        if len(self) < _KEYS_KEPT:
            self[key] = spelled
        return spelled


_keys = _Keys()
_pairs: dict[tuple[str, str], bytes] = {}


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message's bytes, chosen as the SDK's ``_encode_value`` chooses."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"{value} is out of int64's range")
        return b"\x18" + _varint(value & _UINT64)  # negative: ten bytes, two's complement
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        pairs = [_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]
        return _field(b"\x32", b"".join(pairs))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: str, value: Any) -> bytes:
    return _keys[key] + _field(b"\x12", _any_value(value))


def _items(attributes: Attributes) -> Any:
    """``attributes.items()``, from the dict inside when there is one: a ``ReadableSpan``
    hands its ``BoundedAttributes`` out in a ``MappingProxyType``, and iterating that
    goes through ``Mapping``'s Python methods, a call per attribute.

    Reads the SDK's private ``ReadableSpan._attributes`` (via ``_held_attributes``)
    and ``BoundedAttributes._dict``; if a later SDK renames either, the public
    mapping is read instead (tests/metering/test_otlp_wire.py fails then).
    """
    if type(attributes) is BoundedAttributes:
        inner = getattr(attributes, "_dict", None)
        if type(inner) is dict:
            return inner.items()
    return attributes.items() if attributes else ()


def _held_attributes(span: ReadableSpan) -> Attributes:
    """A span's attributes as it holds them (``_items`` reads the dict inside)."""
    held = getattr(span, "_attributes", None)
    return held if type(held) is BoundedAttributes else span.attributes


def _attributes(tag: bytes, attributes: Attributes) -> list[bytes]:
    """Each attribute as a ``KeyValue`` field under ``tag``; one that fails is logged and left
    out, as the SDK's encoder does.

    A string attribute's ``KeyValue`` (length first) is kept by key and value:
    most repeat from request to request (the operation, the model, the tier,
    the replica). The kept ones are forgotten all at once when there are
    ``_PAIRS_KEPT`` of them, so unique values (request ids) cannot crowd out
    the repeated ones for long.
    """
    out = []
    pairs = _pairs
    for key, value in _items(attributes):
        if type(value) is str:
            pair = pairs.get((key, value))
            if pair is None:
                pair = _field(b"", _key_value(key, value))  # its length, then the KeyValue
                if len(pairs) >= _PAIRS_KEPT:
                    pairs.clear()
                pairs[key, value] = pair
            out.append(tag + pair)
            continue
        try:
            out.append(_field(tag, _key_value(key, value)))
        except Exception:
            log.exception("Failed to encode key %s", key)
    return out


def _flags(context: SpanContext | None) -> bytes:
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if context is not None and context.is_remote else 0)
    return _FIXED32(flags)


def _trace_state(tag: bytes, context: SpanContext) -> bytes:
    state = context.trace_state
    if not state:
        return b""
    return _field(tag, ",".join([f"{key}={value}" for key, value in state.items()]).encode())


def _span(span: ReadableSpan) -> bytes:
    """A ``Span`` message's bytes, fields in number order."""
    context = span.context
    assert context is not None  # the SDK's spans always have one
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16),
        b"\x12\x08" + context.span_id.to_bytes(8),
        _trace_state(b"\x1a", context),
    ]
    parent = span.parent
    if parent:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8))
    if span.name:
        parts.append(_field(b"\x2a", span.name.encode()))
    parts.append(_KIND[span.kind])
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    parts += _attributes(b"\x4a", _held_attributes(span))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        parts.append(_field(b"\x5a", _event(event)))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        link_parts = [
            b"\x0a\x10" + link.context.trace_id.to_bytes(16),
            b"\x12\x08" + link.context.span_id.to_bytes(8),
            *_attributes(b"\x22", link.attributes),
        ]
        if link.dropped_attributes:
            link_parts.append(b"\x28" + _varint(link.dropped_attributes))
        link_parts.append(b"\x35" + _flags(link.context))
        parts.append(_field(b"\x6a", b"".join(link_parts)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    status = span.status
    message = status.description
    code = status.status_code.value
    parts.append(
        _field(
            b"\x7a",
            (_field(b"\x12", message.encode()) if message else b"")
            + (b"\x18" + _varint(code) if code else b""),
        )
    )
    parts.append(b"\x85\x01" + _flags(parent))  # field 16, fixed32
    return b"".join(parts)


def _event(event: Event) -> bytes:
    parts = [b"\x09" + _FIXED64(event.timestamp)] if event.timestamp else []
    if event.name:
        parts.append(_field(b"\x12", event.name.encode()))
    parts += _attributes(b"\x1a", event.attributes)
    if event.dropped_attributes:
        parts.append(b"\x20" + _varint(event.dropped_attributes))
    return b"".join(parts)


def _resource(resource: Resource) -> bytes:
    """``ResourceSpans.resource`` (field 1), always present, as the SDK writes it."""
    return _field(b"\x0a", b"".join(_attributes(b"\x0a", resource.attributes)))


def _scope(scope: InstrumentationScope | None) -> bytes:
    """``ScopeSpans.scope`` (field 1), always present (empty without a scope)."""
    if scope is None:
        return b"\x0a\x00"
    parts = []
    if scope.name:
        parts.append(_field(b"\x0a", scope.name.encode()))
    if scope.version:
        parts.append(_field(b"\x12", scope.version.encode()))
    parts += _attributes(b"\x1a", scope.attributes)
    return _field(b"\x0a", b"".join(parts))


class _Group:
    """One resource's spans, by instrumentation scope, in order of first appearance."""

    __slots__ = ("resource", "scopes")

    def __init__(self, resource: Resource):
        self.resource = resource
        self.scopes: dict[InstrumentationScope | None, list[bytes]] = {}


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` holding ``spans``, serialized; see the module docstring.

    Raises what a span that cannot be spelled raises (the caller falls back to the SDK's
    encoder).
    """
    groups: list[_Group] = []
    last: _Group | None = None
    for span in spans:
        resource = span.resource
        if last is None or last.resource is not resource:
            # A batch has one resource (the provider's): compared by identity first, since
            # a ``Resource`` hashes by dumping its attributes as JSON.
            last = next((g for g in groups if g.resource is resource), None)
            if last is None:
                last = next((g for g in groups if g.resource == resource), None)
            if last is None:
                last = _Group(resource)
                groups.append(last)
        scope = span.instrumentation_scope or None
        encoded = _span(span)
        kept = last.scopes.get(scope)
        if kept is None:
            last.scopes[scope] = [encoded]
        else:
            kept.append(encoded)
    out = []
    for group in groups:
        parts = [_resource(group.resource)]
        for scope, spelled in group.scopes.items():
            scope_parts = [_scope(scope)]
            scope_parts += [_field(b"\x12", one) for one in spelled]
            if scope is not None and scope.schema_url:
                scope_parts.append(_field(b"\x1a", scope.schema_url.encode()))
            parts.append(_field(b"\x12", b"".join(scope_parts)))
        if group.resource.schema_url:
            parts.append(_field(b"\x1a", group.resource.schema_url.encode()))
        out.append(_field(b"\x0a", b"".join(parts)))
    return b"".join(out)
