"""Where spans go and how many: the tracer provider built from the standard ``OTEL_*`` variables.

``build_provider`` returns ``None`` when tracing is off (no exporter asked for,
``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``). Otherwise it is
the SDK's ``TracerProvider`` with one ``BatchSpanProcessor`` per exporter (its
own thread, batches of up to 512 every 5 s: ``OTEL_BSP_*``): the OTLP/HTTP
exporter and the console one, as they ship. Endpoint, headers, timeout,
sampler and resource are read by the SDK itself. A batch that fails to export
is counted through the failure hook, never raised.

Sampling is decided at the root. ``OTEL_TRACES_SAMPLER`` (and
``OTEL_TRACES_SAMPLER_ARG``) win when set. Unset, the gateway samples
``parentbased_traceidratio`` at ``DEFAULT_SAMPLE_RATIO`` rather than the SDK's
``parentbased_always_on``: metrics and the ledger already count every request,
and a span tree costs a request more CPU than the rest of its metering.
Parent-based means a client that sends a sampled ``traceparent`` is always
traced and an unsampled one never; ``OTEL_TRACES_SAMPLER=parentbased_always_on``
traces everything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased

log = logging.getLogger("tollway.telemetry")

DEFAULT_SAMPLE_RATIO = 0.01


class CountingExporter(SpanExporter):
    """Passes spans on; a batch that fails to export is counted as ``export``."""

    def __init__(self, inner: SpanExporter, failed: Callable[[str], None]):
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


def build_provider(service_name: str, failed: Callable[[str], None]) -> TracerProvider | None:
    """A provider with one batch processor per exporter the environment names, else None.

    On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    is set or ``OTEL_TRACES_EXPORTER`` names ``otlp``/``console``.
    ``OTEL_SERVICE_NAME`` wins over ``service_name``.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")} - {""}
    if not names and (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = {"otlp"}
    if "none" in names:
        return None
    exporters: list[SpanExporter] = []
    for name in sorted(names):
        if name == "otlp":
            exporters.append(_otlp_exporter(env))
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported; ignored", name)
    if not exporters:
        return None
    resource = Resource.create({})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource, sampler=default_sampler(env))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(CountingExporter(exporter, failed)))
    return provider


def default_sampler(env: Mapping[str, str]) -> Sampler | None:
    """The gateway's sampler when ``OTEL_TRACES_SAMPLER`` is unset; None lets the SDK read it."""
    if env.get("OTEL_TRACES_SAMPLER", "").strip():
        return None
    return ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not installed; exporting http/protobuf", protocol)
    return OTLPSpanExporter()
