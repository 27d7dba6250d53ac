"""Usage sums from the ledger: ``usage_hourly`` grouped over a range of whole UTC hours.

``usage(db, group_by, start, end, filters)`` adds up the hourly sums that the
batch insert keeps (``ledger.store``) in the same transaction as the rows, so
a sum here is exactly the sum of the rows, and of the response headers they
carried: integers all the way (nano-dollars, micro-GPU-seconds), added by
PostgreSQL as ``numeric`` (no overflow) and spelled once, by ``UsageRow.public``.

Granularity is the hour: ``hour_range`` widens ``[start, end)`` to the whole
UTC hours that overlap it (start down, end up), and the answer states the
range it summed. A request counts in the hour its ``finished_at`` falls in.

``Filters`` (tenant, key id, tier, model) are shared with the per-request rows
(``ledger.usage_requests``): one rule for what a filter means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

from metering.money import fmt_nanos
from metering.report import MICROS

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Db: TypeAlias = asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy

GroupBy = Literal["tenant", "key", "tier", "model", "cache", "day", "hour"]
GROUPS: tuple[GroupBy, ...] = get_args(GroupBy)

HOUR = timedelta(hours=1)

# Each group's key as SQL over usage_hourly; day and hour keys are ISO 8601 in UTC,
# which also sort in time order.
_KEY_SQL: dict[GroupBy, str] = {
    "tenant": "tenant",
    "key": "key_id",
    "tier": "tier",
    "model": "model",
    "cache": "cache",
    "day": "to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "hour": "to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
}
_SUMS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "gpu_us",
    "cost_nanos",
    "cost_loaded_nanos",
    "saved_nanos",
)


def iso(moment: datetime) -> str:
    """A time as the usage API spells it: ISO 8601 in UTC with ``Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def hour_range(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` widened to whole UTC hours: every hour it overlaps counts whole."""
    first = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    last = end.astimezone(UTC)
    floor = last.replace(minute=0, second=0, microsecond=0)
    if floor == last:
        return first, last
    try:
        return first, floor + HOUR
    except OverflowError:  # in 9999-12-31 23:00, the last hour a datetime has
        return first, floor


@dataclass(frozen=True, slots=True)
class Filters:
    """Which rows count: each filter set is an equality on its column (None: any)."""

    tenant: str | None = None
    key: str | None = None  # a key id (``Principal.key_id``), never the key
    tier: str | None = None
    model: str | None = None

    def where(self, args: list[object]) -> list[str]:
        """SQL conditions for the filters set, their values appended to ``args``."""
        conditions = []
        for column, value in (
            ("tenant", self.tenant),
            ("key_id", self.key),
            ("tier", self.tier),
            ("model", self.model),
        ):
            if value is not None:
                args.append(value)
                conditions.append(f"{column} = ${len(args)}")
        return conditions

    def public(self) -> dict[str, str | None]:
        return {"tenant": self.tenant, "key": self.key, "tier": self.tier, "model": self.model}


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Exact sums for one group (or the total): counts, micro-GPU-seconds, nano-dollars."""

    key: str
    requests: int = 0
    errors: int = 0  # requests that ended with a status of 400 or more
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    gpu_us: int = 0
    cost_nanos: int = 0
    cost_loaded_nanos: int = 0
    saved_nanos: int = 0

    def sums(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in _SUMS)

    def public(self) -> dict[str, Any]:
        """The row as the usage API's JSON and CSV show it (money as the headers spell it)."""
        return {
            "key": self.key,
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "gpu_seconds": self.gpu_us / MICROS,
            "cost_usd": fmt_nanos(self.cost_nanos),
            "cost_loaded_usd": fmt_nanos(self.cost_loaded_nanos),
            "saved_usd": fmt_nanos(self.saved_nanos),
        }


USAGE_FIELDS: tuple[str, ...] = tuple(UsageRow("").public())


def total(rows: list[UsageRow], key: str = "total") -> UsageRow:
    """The exact sum of ``rows``."""
    sums = [sum(column) for column in zip(*(row.sums() for row in rows), strict=True)]
    return UsageRow(key, *sums) if sums else UsageRow(key)


@dataclass(frozen=True, slots=True)
class Usage:
    """The answer: rows in byte order of their keys, over ``[start, end)`` (whole hours)."""

    group_by: GroupBy
    start: datetime
    end: datetime
    filters: Filters
    rows: list[UsageRow] = field(default_factory=list)

    @property
    def total(self) -> UsageRow:
        return total(self.rows)


def usage_query(group_by: GroupBy, filters: Filters, args: list[object]) -> str:
    """The grouped-sums statement; ``args`` must hold the range's two ends first."""
    conditions = ["hour >= $1", "hour < $2", *filters.where(args)]
    sums = ", ".join(f"sum({name})" for name in _SUMS)
    key = _KEY_SQL[group_by]
    # Byte order, whatever the database's collation: the same order everywhere.
    return (
        f"SELECT {key} AS key, {sums} FROM usage_hourly"
        f' WHERE {" AND ".join(conditions)} GROUP BY 1 ORDER BY {key} COLLATE "C"'
    )


async def usage(
    db: Db,
    group_by: GroupBy,
    start: datetime,
    end: datetime,
    filters: Filters | None = None,
) -> Usage:
    """Sums over the whole UTC hours overlapping ``[start, end)``, one row per group."""
    filters = filters or Filters()
    first, last = hour_range(start, end)
    args: list[object] = [first, last]
    records = await db.fetch(usage_query(group_by, filters, args), *args)
    rows = [UsageRow(r["key"], *(int(value) for value in list(r.values())[1:])) for r in records]
    return Usage(group_by, first, last, filters, rows)
