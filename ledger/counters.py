"""Rebuilding Redis's spend counters from the ledger: losing Redis loses no money.

The day's and the month's sums per tenant come from ``usage_hourly`` (exact,
and cheap: one row per hour, tenant, key, tier, model and cache status) and
raise Redis's counters to at least that (``SpendCounters.rebuild``). Rows still
in a gateway's spool are not in the ledger yet; Redis keeps whatever it counted
above the ledger's figure, so the two never add up to less than either.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cache.spend import SpendCounters, Sums, window_keys
from ledger.database import Conn

QUERY = """
SELECT tenant,
       coalesce(sum(requests) FILTER (WHERE hour >= $2), 0) AS day_requests,
       coalesce(sum(cost_nanos) FILTER (WHERE hour >= $2), 0) AS day_cost,
       coalesce(sum(cost_loaded_nanos) FILTER (WHERE hour >= $2), 0) AS day_loaded,
       sum(requests) AS month_requests,
       sum(cost_nanos) AS month_cost,
       sum(cost_loaded_nanos) AS month_loaded
FROM usage_hourly
WHERE hour >= $1 AND hour <= $3
GROUP BY tenant
"""


async def ledger_spend(conn: Conn, now: datetime) -> dict[str, Sums]:
    """The ledger's spend per counter key (each tenant's day and month containing ``now``)."""
    now = now.astimezone(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    out: dict[str, Sums] = {}
    for row in await conn.fetch(QUERY, month, day, now):
        day_key, month_key = window_keys(SpendCounters.PREFIX, row["tenant"], now)
        out[day_key] = Sums(int(row["day_requests"]), int(row["day_cost"]), int(row["day_loaded"]))
        out[month_key] = Sums(
            int(row["month_requests"]), int(row["month_cost"]), int(row["month_loaded"])
        )
    return out


async def rebuild(conn: Conn, counters: SpendCounters, now: datetime | None = None) -> int:
    """Raise Redis's spend counters to the ledger's; how many tenants. ``ConnectionError``
    if Redis did not take them."""
    sums = await ledger_spend(conn, now or datetime.now(UTC))
    if not await counters.rebuild(sums):
        raise ConnectionError("Redis did not take the rebuilt spend counters")
    return len(sums) // 2
