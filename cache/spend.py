"""Each tenant's spend of the UTC day and month, in Redis, shared by every gateway.

Budgets read these counters (``gateway.budgets``) so that each gateway sees
what the others spent. They are hot, rebuildable state: PostgreSQL's ledger
is the record. ``add_many`` (a recorder consumer) sums settled requests per
tenant and window in memory; a background task adds the sums to Redis every
``interval_s`` in one pipeline. Sums Redis did not take stay and go with the
next flush, so a Redis outage delays them rather than losing them (at most a
reply lost after Redis applied it counts twice: budgets then err on the safe
side). ``rebuild`` raises each counter to the ledger's figure (never lowers
it): after Redis lost its data, or on demand (``tollway db rebuild-counters``).

Keys (``P`` the prefix, default ``tollway``; a hash per tenant and window)::

    {P:spend:<tenant>}:day:YYYYMMDD    requests, cost_nanos, cost_loaded_nanos
    {P:spend:<tenant>}:month:YYYYMM    the same for the calendar month

Each expires ``TTL_S`` after its last write, well past its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from redis.asyncio import Redis

from cache.redis_client import RedisClient
from metering.budget import WindowSpend, utc
from metering.money import from_nanos
from metering.pricing import Cost
from metering.report import RequestReport

log = logging.getLogger("tollway.spend")

TTL_S = 40 * 86_400
FIELDS = ("requests", "cost_nanos", "cost_loaded_nanos")

# Raise each field of KEYS[1] to at least the value given (ARGV: ttl, then the
# three values in FIELDS order); never lowers one that is already higher.
RAISE = """
local fields = {'requests', 'cost_nanos', 'cost_loaded_nanos'}
for j, field in ipairs(fields) do
  local want = tonumber(ARGV[1 + j])
  local have = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if want > have then redis.call('HSET', KEYS[1], field, ARGV[1 + j]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class Sums(NamedTuple):
    requests: int = 0
    cost_nanos: int = 0
    cost_loaded_nanos: int = 0

    def __add__(self, other: object) -> Sums:
        assert isinstance(other, Sums)
        return Sums(*(a + b for a, b in zip(self, other, strict=True)))


def spend_tag(prefix: str, tenant: str) -> str:
    return f"{{{prefix}:spend:{tenant}}}"


def window_keys(prefix: str, tenant: str, at: datetime) -> tuple[str, str]:
    """The tenant's day and month hashes for the UTC time ``at``."""
    at = utc(at)
    tag = spend_tag(prefix, tenant)
    return f"{tag}:day:{at:%Y%m%d}", f"{tag}:month:{at:%Y%m}"


class SpendCounters:
    PREFIX = "tollway"

    def __init__(self, redis: RedisClient, *, interval_s: float = 0.2):
        self.redis = redis
        self.prefix = self.PREFIX
        self.interval_s = interval_s
        self._pending: dict[str, Sums] = {}  # key -> sums not yet in Redis
        self._task: asyncio.Task[None] | None = None

    def add_many(self, reports: Sequence[RequestReport]) -> None:
        """Count settled requests (dated by when they finished). Never blocks."""
        for report in reports:
            at = datetime.fromtimestamp(report.finished_us / 1_000_000, UTC)
            sums = Sums(1, report.cost.marginal_nanos, report.cost.loaded_nanos)
            for key in window_keys(self.prefix, report.tenant, at):
                self._pending[key] = self._pending.get(key, Sums()) + sums

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tollway-spend-counters")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> bool:
        """Add the pending sums to Redis; False (and kept for the next flush) if it failed."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}

        async def add(redis: Redis) -> bool:
            pipe = redis.pipeline(transaction=False)
            for key, sums in batch.items():
                for field, value in zip(FIELDS, sums, strict=True):
                    if value:
                        pipe.hincrby(key, field, value)
                pipe.expire(key, TTL_S)
            await pipe.execute()
            return True

        if await self.redis.call("spend.add", add, False, budget_s=2.0):
            return True
        for key, sums in batch.items():  # kept, added to what came since
            self._pending[key] = self._pending.get(key, Sums()) + sums
        return False

    async def spend(self, tenant: str, now: datetime) -> WindowSpend | None:
        """The tenant's spend in the UTC day and month containing ``now``; None if Redis fails."""
        keys = window_keys(self.prefix, tenant, now)

        async def read(redis: Redis) -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, ["cost_nanos", "cost_loaded_nanos"])
            result: list[Any] = await pipe.execute()
            return result

        result = await self.redis.call("spend.read", read, None)
        if result is None:
            return None
        day, month = (
            Cost.of_usd(from_nanos(_int(marginal)), from_nanos(_int(loaded)))
            for marginal, loaded in result
        )
        return WindowSpend(day, month)

    async def rebuild(self, ledger: Mapping[str, Sums], budget_s: float = 10.0) -> bool:
        """Raise each counter named in ``ledger`` (key -> the ledger's sums) to at least
        its figure; False if Redis did not take it."""
        if not ledger:
            return True

        async def apply(redis: Redis) -> bool:
            pipe = redis.pipeline(transaction=False)
            for key, sums in ledger.items():
                pipe.eval(RAISE, 1, key, TTL_S, *sums)  # one key a call: cluster-safe
            await pipe.execute()
            return True

        return await self.redis.call("spend.rebuild", apply, False, budget_s=budget_s)


def _int(value: Any) -> int:
    return 0 if value is None else int(value)
