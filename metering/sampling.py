"""Head sampling decided once, at the root, before any SDK object is built.

A request the sampler drops should cost next to nothing: no span object, no
context, no attribute dicts, only a ``traceparent`` for vLLM saying the trace
is unsampled. The SDK only decides inside ``Tracer.start_span``, after it has
generated ids, built a ``SpanContext`` and a ``NonRecordingSpan``, and the
upstream call then needs a context and a propagator to spell the header
(about 20 us per request, measured with bench/metering). So for a root span
(no incoming ``traceparent``, no current span) of the SDK's own
``RandomIdGenerator`` (what the ``OTEL_*`` variables build), ``RootSampler``
applies the tracer's sampler's rule first, to the random low 64 bits of a
trace id that does not exist yet:

- dropped: nothing is made, not even ids. If the request goes to vLLM, its
  ``traceparent`` is drawn then (``dropped_traceparent``): random ids among
  those the rule drops, flagged unsampled;
- sampled: a trace id with those low bits is drawn and the root is made
  with it (``LiteTracer.start_root``) as the SDK would make it, without asking
  the sampler again: for these samplers a kept root carries the attributes
  given and no trace state.

The rule (``_root_bound``: a ratio sampler keeps a trace id whose low 64 bits
are below its bound; always-on and always-off are bounds too) stands in for
``should_sample``, which builds a ``SamplingResult`` and looks up the current
context. Any other sampler, and any other id generator, is asked as the SDK
would.

Requests that carry a ``traceparent`` take the SDK's path unchanged: the
parent's flags decide (``parentbased_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from itertools import repeat
from random import getrandbits
from typing import Any

from opentelemetry import context, trace
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind

from metering.lite_span import PARENT_BASED, LiteTracer, static_decision

DROPPED_BATCH = 256  # unsampled traceparents drawn at a time
_LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT  # what a ratio sampler compares with its bound


class HandOffIds(IdGenerator):
    """The tracer's id generator, except that the next trace id can be handed in."""

    def __init__(self, inner: IdGenerator):
        self.inner = inner
        self._next = 0

    def hand(self, trace_id: int) -> None:
        self._next = trace_id

    def generate_trace_id(self) -> int:
        handed = self._next
        if handed:
            self._next = 0
            return handed
        return self.inner.generate_trace_id()

    def generate_span_id(self) -> int:
        return self.inner.generate_span_id()

    def is_trace_id_random(self) -> bool:
        return self.inner.is_trace_id_random()


class Unsampled:
    """A dropped root: its ids and the ``traceparent`` that tells vLLM so."""

    __slots__ = ("span_id", "trace_id", "traceparent")

    def __init__(self, trace_id: int, span_id: int, flags: int):
        self.trace_id = trace_id
        self.span_id = span_id
        self.traceparent = f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


class RootSampler:
    """Decides a root request span's sampling once; see the module docstring.

    Built only for an SDK ``Tracer`` (the only kind whose sampler and id
    generator can be read); it swaps that tracer's id generator for a
    ``HandOffIds`` around the original. Everything runs on the event loop's
    thread. Use: ``presample()`` first; if it returns False, ``start()`` at once.
    """

    def __init__(self, tracer: LiteTracer):
        self._tracer = tracer
        ids = tracer.id_generator
        self._ids = ids if isinstance(ids, HandOffIds) else HandOffIds(ids)
        tracer.id_generator = self._ids
        self._flags = "02" if self._ids.is_trace_id_random() else "00"  # W3C RANDOM_TRACE_ID
        self._flags_suffix = "-" + self._flags
        # The rule is applied here only for the SDK's RandomIdGenerator (the one the
        # OTEL_* variables give): a dropped root's ids are drawn when they are needed.
        random_ids = type(self._ids.inner) is RandomIdGenerator
        self._bound = _root_bound(tracer.sampler) if random_ids else None
        self._armed = False
        self._dropped_pool: list[str] = []  # drawn ahead (``dropped_traceparent``)
        self._current = _context_reader()

    def presample(self) -> bool:
        """True if the sampler's rule drops this root: nothing is built, not even its ids.

        A dropped root's ``traceparent``, if vLLM is to be told, comes from
        ``dropped_traceparent``. False: ``start()`` must follow; when the rule
        kept the root, its trace id is already handed to the SDK. Unknown
        samplers, other id generators and a context that holds anything (a
        current span, baggage) are left to ``start()``.
        """
        bound = self._bound
        if bound is None or self._current():
            return False
        low = getrandbits(64)  # a ratio sampler decides on a trace id's low 64 bits
        if low >= bound:
            return True
        trace_id = getrandbits(64) << 64 | low
        self._ids.hand(trace_id or self._ids.inner.generate_trace_id())
        self._armed = True
        return False

    def dropped_traceparent(self) -> str:
        """A ``traceparent`` for a root ``presample`` dropped: fresh random ids, unsampled.

        Its trace id is drawn among those the sampler drops (low 64 bits at or
        over the bound), as the root's own would have been, so a downstream
        sampler of the same ratio agrees. They are drawn ``DROPPED_BATCH`` at a
        time and handed out one each: the per-request step is a list's ``pop``,
        and the drawing runs as one warm loop (the unsampled ``traceparent``
        drawn one at a time cost the metered gateway about two points of CPU,
        bench/RESULTS.md, 2026-11-23, session 7).
        """
        pool = self._dropped_pool
        while not pool:
            pool += self._draw_dropped(DROPPED_BATCH)
        return pool.pop()

    def _draw_dropped(self, n: int) -> list[str]:
        """Up to ``n`` unsampled ``traceparent``s: 192 random bits each, kept if the rule drops
        them (and neither id is zero)."""
        bound = self._bound or 0
        suffix = self._flags_suffix
        return [
            # "00-<32 hex: trace id>-<16 hex: span id>-<flags>", spelled in C
            "00-" + bits.to_bytes(24).hex("-", -16) + suffix
            for bits in map(getrandbits, repeat(192, n))  # the trace id, then the span id
            if bits >> 64 & _LOW_64 >= bound and bits & _LOW_64 and bits >> 64
        ]

    def start(
        self, name: str, kind: SpanKind, attributes: Mapping[str, Any]
    ) -> trace.Span | Unsampled:
        """A root span: a real SDK span if sampled, else the ids to propagate."""
        tracer, ids = self._tracer, self._ids
        try:
            if self._armed:  # kept by the rule, with the trace id handed to ``ids``
                return tracer.start_root(name, ids.generate_trace_id(), kind, attributes)
            if trace.get_current_span() is not trace.INVALID_SPAN:
                return tracer.start_span(name, None, kind, attributes)  # a parent decides
            trace_id = ids.inner.generate_trace_id()
            result = tracer.sampler.should_sample(None, trace_id, name, kind, attributes)
            if result.decision is Decision.DROP:
                return Unsampled(trace_id, ids.inner.generate_span_id(), int(self._flags, 16))
            ids.hand(trace_id)
            return tracer.start_span(name, None, kind, attributes)
        finally:
            self._armed = False
            ids.hand(0)  # never left armed, whatever start_span did


def _context_reader() -> Callable[[], context.Context]:
    """``context.get_current``, as one C call when the API keeps the current context in a
    ``ContextVar`` (its default runtime): the check runs on every request.

    Reads the API's ``_RUNTIME_CONTEXT._current_context``; any other runtime, or
    a later API that renames them, gets ``get_current`` itself
    (tests/metering/test_sampling.py checks which one is used).
    """
    variable = getattr(getattr(context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    if isinstance(variable, ContextVar):
        read: Callable[[], context.Context] = variable.get
        return read
    return context.get_current


def _root_bound(sampler: Sampler) -> int | None:
    """For the SDK's samplers, the bound a root's trace id (low 64 bits) must be under to be kept.

    None for any other sampler (it is asked). Reads ``ParentBased._root`` and
    ``StaticSampler._decision``; if a later SDK renames them, the sampler is asked.
    """
    root: object = sampler
    if type(root) in PARENT_BASED:
        root = getattr(root, "_root", None)  # a root has no parent: its root sampler decides
    if type(root) is TraceIdRatioBased:
        return root.bound
    decision = static_decision(root)
    if decision is None:
        return None
    return 0 if decision is Decision.DROP else _LOW_64 + 1  # recorded, maybe sampled
