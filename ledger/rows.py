"""A ledger row: one metered request as the database stores it, and as the spool keeps it.

``LedgerRow.of(report)`` is the only place a ``RequestReport`` becomes a row.
Its fields are the columns of ``usage_requests`` in order (``finished_us`` is
stored as ``finished_at``); figures stay integers: nano-dollars, micro-GPU-
seconds, micro-seconds. The spool writes a row as a MessagePack array
(``encode``/``decode``): compact, and read back without a schema lookup.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from metering.report import RequestReport

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class LedgerRow(msgspec.Struct, array_like=True, frozen=True):
    finished_us: int  # Unix time in micro-seconds, UTC
    request_id: str
    tenant: str
    key_id: str
    tier: str
    model: str
    replica: str
    endpoint: str
    status: int
    error_type: str | None
    cache: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    gpu_us: int
    cost_nanos: int
    cost_loaded_nanos: int
    saved_nanos: int
    attempts: int
    route_score: float | None
    fallback_from: str | None
    duration_us: int
    ttft_us: int | None

    @classmethod
    def of(cls, report: RequestReport) -> LedgerRow:
        usage, cost = report.usage, report.cost
        ttft = report.ttft_s
        return cls(
            finished_us=report.finished_us,
            request_id=report.request_id,
            tenant=report.tenant,
            key_id=report.key_id,
            tier=report.tier,
            model=report.model,
            replica=report.replica,
            endpoint=report.operation,
            status=report.status,
            error_type=report.error_type,
            cache=report.cache,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_prompt_tokens,
            gpu_us=report.gpu_us,
            cost_nanos=cost.marginal_nanos,
            cost_loaded_nanos=cost.loaded_nanos,
            saved_nanos=report.saved_nanos,
            attempts=report.attempts,
            route_score=report.route_score,
            fallback_from=report.fallback_from,
            duration_us=round(report.duration_s * 1_000_000),
            ttft_us=None if ttft is None else round(ttft * 1_000_000),
        )

    @property
    def finished_at(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.finished_us)


COLUMNS: tuple[str, ...] = ("finished_at", *LedgerRow.__struct_fields__[1:])

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LedgerRow)


def encode(row: LedgerRow) -> bytes:
    return _encoder.encode(row)


def decode(payload: bytes) -> LedgerRow:
    return _decoder.decode(payload)
