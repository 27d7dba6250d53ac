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
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from redis.asyncio import Redis

from cache.redis_client import RedisClient
from metering.budget import utc
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


# Budget reservations. Every key of one call shares the tenant's hash tag.
# KEYS: holds (zset rid -> expiry ms), hold (hash rid -> "amount key key..."),
# then the windows to check. ARGV: now ms, rid, amount, expiry ms, ttl, then one
# limit per window (nano-dollars of loaded cost). Held holds past their expiry
# (a gateway died holding them) are released first. Returns {1, remaining...}
# or {0, index of the window that refused, remaining...}: remaining is each
# window's limit minus spent minus held, once this reservation is held (or not).
_RELEASE_EXPIRED = """
local function release(rid)
  local h = redis.call('HGET', KEYS[2], rid)
  if h then
    local amount = nil
    for part in string.gmatch(h, '%S+') do
      if amount == nil then amount = tonumber(part)
      else redis.call('HINCRBY', part, 'held', -amount) end
    end
    redis.call('HDEL', KEYS[2], rid)
  end
  redis.call('ZREM', KEYS[1], rid)
end
"""
RESERVE = (
    _RELEASE_EXPIRED
    + """
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do release(rid) end
local amount = tonumber(ARGV[3])
local remaining = {}
local refused = 0
for i = 3, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'cost_loaded_nanos', 'held')
  local left = tonumber(ARGV[5 + i - 2]) - tonumber(v[1] or '0') - tonumber(v[2] or '0')
  if refused == 0 and left < amount then refused = i - 2 end
  remaining[#remaining + 1] = left
end
if refused > 0 then return {0, refused, unpack(remaining)} end
local hold = ARGV[3]
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'held', amount)
  redis.call('EXPIRE', KEYS[i], ARGV[5])
  remaining[i - 2] = remaining[i - 2] - amount
  hold = hold .. ' ' .. KEYS[i]
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], hold)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {1, 0, unpack(remaining)}
"""
)
# KEYS: holds, hold. ARGV: rid. Releases the request's hold, if it still has one.
RELEASE = (
    _RELEASE_EXPIRED
    + """
release(ARGV[1])
return 1
"""
)


class Reservation(NamedTuple):
    """A reservation's outcome: held, or refused by window ``refused`` (an index)."""

    held: bool
    refused: int | None
    remaining_nanos: tuple[int, ...]  # per window: limit - spent - held (this one included)


class Sums(NamedTuple):
    requests: int = 0
    cost_nanos: int = 0
    cost_loaded_nanos: int = 0

    def __add__(self, other: object) -> Sums:
        assert isinstance(other, Sums)
        return Sums(*(a + b for a, b in zip(self, other, strict=True)))


def spend_tag(prefix: str, tenant: str) -> str:
    return f"{{{prefix}:spend:{tenant}}}"


def window_keys(prefix: str, tenant: str, at: datetime, key_id: str = "") -> tuple[str, str]:
    """The day and month hashes for the UTC time ``at``: the tenant's, or (``key_id``)
    one of its keys' (a key's budget), under the tenant's hash tag."""
    at = utc(at)
    tag = spend_tag(prefix, tenant) + (f":key:{key_id}" if key_id else "")
    return f"{tag}:day:{at:%Y%m%d}", f"{tag}:month:{at:%Y%m}"


def hold_keys(prefix: str, tenant: str) -> tuple[str, str]:
    tag = spend_tag(prefix, tenant)
    return f"{tag}:holds", f"{tag}:hold"


class SpendCounters:
    PREFIX = "tollway"

    def __init__(self, redis: RedisClient, *, interval_s: float = 0.2):
        self.redis = redis
        self.prefix = self.PREFIX
        self.interval_s = interval_s
        self._pending: dict[str, Sums] = {}  # key -> sums not yet in Redis
        self._releases: list[tuple[str, str]] = []  # (tenant, request id) holds to let go
        self._holding: dict[str, str] = {}  # request id -> tenant, while it holds budget
        self._task: asyncio.Task[None] | None = None

    def add_many(self, reports: Sequence[RequestReport]) -> None:
        """Count settled requests (dated by when they finished), the tenant's and its key's.
        Never blocks."""
        for report in reports:
            at = datetime.fromtimestamp(report.finished_us / 1_000_000, UTC)
            sums = Sums(1, report.cost.marginal_nanos, report.cost.loaded_nanos)
            keys: tuple[str, ...] = window_keys(self.prefix, report.tenant, at)
            if report.key_id:
                keys += window_keys(self.prefix, report.tenant, at, report.key_id)
            for key in keys:
                self._pending[key] = self._pending.get(key, Sums()) + sums
            tenant = self._holding.pop(report.request_id, None)
            if tenant is not None:  # its spend first, then its hold: counted twice a moment,
                self._releases.append((tenant, report.request_id))  # never zero times

    def holding(self, request_id: str, tenant: str) -> None:
        """``request_id`` holds a reservation: let it go when its report is counted."""
        self._holding[request_id] = tenant

    async def reserve(
        self,
        tenant: str,
        request_id: str,
        amount_nanos: int,
        windows: Sequence[tuple[str, int]],
        hold_s: float,
    ) -> Reservation | None:
        """Hold ``amount_nanos`` in every window (key, limit) if all have room, atomically
        across gateways; None if Redis did not answer."""
        holds, hold = hold_keys(self.prefix, tenant)
        now_ms = int(time.time() * 1000)
        keys = [holds, hold, *(key for key, _ in windows)]
        argv: list[int | str] = [now_ms, request_id, amount_nanos, now_ms + int(hold_s * 1000)]
        argv += [TTL_S, *(limit for _, limit in windows)]

        async def run(redis: Redis) -> list[Any]:
            result: list[Any] = await redis.eval(RESERVE, len(keys), *keys, *argv)
            return result

        result = await self.redis.call("budget.reserve", run, None)
        if result is None:
            return None
        held, refused, *remaining = (int(v) for v in result)
        return Reservation(bool(held), refused - 1 if refused else None, tuple(remaining))

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
        """Add the pending sums to Redis, then let go of the settled requests' holds;
        False (sums kept for the next flush) if it failed. Holds not let go expire."""
        if not self._pending and not self._releases:
            return True
        batch, self._pending = self._pending, {}
        releases, self._releases = self._releases, []

        async def add(redis: Redis) -> bool:
            pipe = redis.pipeline(transaction=False)
            for key, sums in batch.items():
                for field, value in zip(FIELDS, sums, strict=True):
                    if value:
                        pipe.hincrby(key, field, value)
                pipe.expire(key, TTL_S)
            for tenant, request_id in releases:
                pipe.eval(RELEASE, 2, *hold_keys(self.prefix, tenant), request_id)
            await pipe.execute()
            return True

        if await self.redis.call("spend.add", add, False, budget_s=2.0):
            return True
        for key, sums in batch.items():  # kept, added to what came since
            self._pending[key] = self._pending.get(key, Sums()) + sums
        return False

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
