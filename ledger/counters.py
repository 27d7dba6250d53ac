"""Rebuilding Redis's spend counters from the ledger: losing Redis loses no money.

The day's and the month's sums per tenant, and per key (a key's own budget),
come from ``usage_hourly`` (exact, and cheap: one row per hour, tenant, key,
tier, model and cache status) and raise Redis's counters to at least that
(``SpendCounters.rebuild``), at a gateway's start, when a gateway finds that
Redis lost them (``SpendCounters.lost``), or with ``tollway db rebuild-counters``. Rows still
in a gateway's spool are not in the ledger yet; Redis keeps whatever it counted
above the ledger's figure, so the two never add up to less than either.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cache.spend import SpendCounters, Sums, window_keys
from ledger.database import Conn

QUERY = """
SELECT tenant, key_id,
       coalesce(sum(requests) FILTER (WHERE hour >= $2), 0) AS day_requests,
       coalesce(sum(cost_nanos) FILTER (WHERE hour >= $2), 0) AS day_cost,
       coalesce(sum(cost_loaded_nanos) FILTER (WHERE hour >= $2), 0) AS day_loaded,
       sum(requests) AS month_requests,
       sum(cost_nanos) AS month_cost,
       sum(cost_loaded_nanos) AS month_loaded
FROM usage_hourly
WHERE hour >= $1 AND hour <= $3
GROUP BY tenant, key_id
"""


async def ledger_spend(conn: Conn, now: datetime) -> dict[str, Sums]:
    """The ledger's spend per counter key: each tenant's and each of its keys' day and
    month containing ``now``."""
    now = now.astimezone(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    out: dict[str, Sums] = {}
    for row in await conn.fetch(QUERY, month, day, now):
        today = Sums(int(row["day_requests"]), int(row["day_cost"]), int(row["day_loaded"]))
        this_month = Sums(
            int(row["month_requests"]), int(row["month_cost"]), int(row["month_loaded"])
        )
        tenant, key_id = row["tenant"], row["key_id"]
        keys = [window_keys(SpendCounters.PREFIX, tenant, now)]
        if key_id:
            keys.append(window_keys(SpendCounters.PREFIX, tenant, now, key_id))
        for day_key, month_key in keys:  # the tenant's sum its keys' rows
            out[day_key] = out.get(day_key, Sums()) + today
            out[month_key] = out.get(month_key, Sums()) + this_month
    return out


async def rebuild(conn: Conn, counters: SpendCounters, now: datetime | None = None) -> int:
    """Raise Redis's spend counters to the ledger's; how many counters (a day's or a
    month's, a tenant's or a key's). ``ConnectionError`` if Redis did not take them."""
    sums = await ledger_spend(conn, now or datetime.now(UTC))
    if not await counters.rebuild(sums):
        raise ConnectionError("Redis did not take the rebuilt spend counters")
    return len(sums)
