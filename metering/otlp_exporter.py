"""The SDK's OTLP/HTTP span exporter, with its batches encoded by ``metering.otlp_wire``.

Everything but the encoding is the SDK's ``OTLPSpanExporter``: the endpoint,
headers, timeout, compression and TLS it reads from ``OTEL_EXPORTER_OTLP_*``,
its HTTP client, its retries and its own metrics. Only ``export`` is
replaced, to hand that client the bytes ``encode_request`` wrote instead of
the ones the SDK's message objects serialize to (the same message, about
five times faster: ``metering.otlp_wire``).

It reads four of the SDK exporter's private fields (``_client``,
``_metrics``, ``_shutdown``, ``_max_request_size``). If a later SDK renames
one of the first three, or ``encode_request``
cannot spell a batch, or a batch is over the exporter's size limit, the
SDK's own ``export`` handles that batch: slower, never wrong.
tests/metering/test_otlp_exporter.py fails if the fast path is not taken
with the installed SDK.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from metering.otlp_wire import encode_request

log = logging.getLogger("tollway.telemetry")

_STATUS_CODE = "http.response.status_code"


class WireSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` whose ``export`` encodes with ``metering.otlp_wire``."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        metrics = getattr(self, "_metrics", None)
        if getattr(self, "_shutdown", True) or client is None or metrics is None:
            return super().export(spans)  # shut down (it says so), or an SDK we do not know
        try:
            data = encode_request(spans)
        except Exception:
            log.debug("encoding a span batch fell back to the SDK's encoder", exc_info=True)
            return super().export(spans)
        limit = getattr(self, "_max_request_size", 0)
        if isinstance(limit, int) and 0 < limit < len(data):
            return super().export(spans)  # the SDK drops it, logs and counts that
        with metrics.export_operation(len(spans)) as result:
            sent = client.export(data)
            if not sent.success:
                result.error = sent.error
                status = sent.status_code
                result.error_attrs = {_STATUS_CODE: status} if status is not None else None
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
