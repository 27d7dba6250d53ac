"""Writing ledger rows into PostgreSQL: monthly partitions and one statement per batch.

``insert`` stores a batch in one transaction: the rows into ``usage_requests``
(a row already there, same request id and time, is skipped) and, from the
rows actually stored, their sums into ``usage_hourly``. Replaying a batch
therefore changes nothing, which is what lets the spool resend after a crash.

Partitions are made on demand, one per UTC month (``usage_requests_yYYYYmMM``),
before a batch that needs them; ``drop_before`` removes whole months past the
retention.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from ledger.database import Conn
from ledger.rows import COLUMNS, LedgerRow

Month = tuple[int, int]  # (year, month)

_TYPES = {
    "finished_at": "timestamptz",
    "status": "smallint",
    "attempts": "smallint",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "cached_tokens": "integer",
    "route_score": "real",
}
_BIGINT = {"gpu_us", "cost_nanos", "cost_loaded_nanos", "saved_nanos", "duration_us", "ttft_us"}
_SUMS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "gpu_us",
    "cost_nanos",
    "cost_loaded_nanos",
    "saved_nanos",
)
_GROUP = ("tenant", "key_id", "tier", "model", "cache")


def _sql_type(column: str) -> str:
    return _TYPES.get(column, "bigint" if column in _BIGINT else "text")


INSERT = f"""
WITH stored AS (
    INSERT INTO usage_requests ({", ".join(COLUMNS)})
    SELECT * FROM unnest({", ".join(f"${i}::{_sql_type(c)}[]" for i, c in enumerate(COLUMNS, 1))})
    ON CONFLICT DO NOTHING
    RETURNING finished_at, status, {", ".join(_GROUP + _SUMS)}
), summed AS (
    INSERT INTO usage_hourly AS h
        (hour, {", ".join(_GROUP)}, requests, errors, {", ".join(_SUMS)})
    SELECT date_trunc('hour', finished_at), {", ".join(_GROUP)},
           count(*), count(*) FILTER (WHERE status >= 400),
           {", ".join(f"sum({s})" for s in _SUMS)}
    FROM stored
    GROUP BY 1, {", ".join(str(i) for i in range(2, len(_GROUP) + 2))}
    ORDER BY 1, {", ".join(str(i) for i in range(2, len(_GROUP) + 2))}
    ON CONFLICT (hour, {", ".join(_GROUP)}) DO UPDATE SET
        requests = h.requests + EXCLUDED.requests,
        errors = h.errors + EXCLUDED.errors,
        {", ".join(f"{s} = h.{s} + EXCLUDED.{s}" for s in _SUMS)}
)
SELECT count(*) FROM stored
"""  # every name above is a constant of this module


def month_of(row: LedgerRow) -> Month:
    at = row.finished_at
    return at.year, at.month


def partition_name(month: Month) -> str:
    return f"usage_requests_y{month[0]:04d}m{month[1]:02d}"


def _next(month: Month) -> Month:
    year, mon = month
    return (year + 1, 1) if mon == 12 else (year, mon + 1)


async def ensure_partition(conn: Conn, month: Month) -> None:
    """Create ``month``'s partition if it is missing (safe with several gateways at once)."""
    start, end = (datetime(y, m, 1, tzinfo=UTC) for y, m in (month, _next(month)))
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tollway.partitions'))")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {partition_name(month)} PARTITION OF usage_requests "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )


async def insert(conn: Conn, rows: Sequence[LedgerRow]) -> int:
    """Store ``rows`` (their months' partitions must exist): how many were new."""
    columns: list[list[object]] = [[] for _ in COLUMNS]
    for row in rows:
        values = column_values(row)
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    stored = await conn.fetchval(INSERT, *columns)
    return int(stored or 0)


def column_values(row: LedgerRow) -> tuple[object, ...]:
    """The row's values in ``COLUMNS`` order, its time as a datetime."""
    values = tuple(getattr(row, name) for name in row.__struct_fields__)
    return (row.finished_at, *values[1:])


async def months_present(conn: Conn) -> list[Month]:
    """The months that have a partition, oldest first."""
    names = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'usage_requests'::regclass"
    )
    found = []
    for record in names:
        name: str = record["relname"]
        if name.startswith("usage_requests_y"):
            found.append((int(name[16:20]), int(name[21:23])))
    return sorted(found)


async def drop_before(conn: Conn, oldest_kept: Month) -> list[Month]:
    """Drop the partitions (and hourly sums) of months before ``oldest_kept``; those dropped."""
    dropped = [m for m in await months_present(conn) if m < oldest_kept]
    for month in dropped:
        await conn.execute(f"DROP TABLE IF EXISTS {partition_name(month)}")
    start = datetime(*oldest_kept, 1, tzinfo=UTC)
    await conn.execute("DELETE FROM usage_hourly WHERE hour < $1", start)
    return dropped


def months(rows: Iterable[LedgerRow]) -> set[Month]:
    return {month_of(row) for row in rows}
