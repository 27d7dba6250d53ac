"""Spend, budget holds and rate limits in Redis, shared by every gateway.

``admit`` is the one atomic call a request makes before it is sent upstream
(``gateway.budgets``): it takes its units from its rate limits and holds its
worst-case cost against its budgets, or takes nothing. Settled requests'
spend is added, and their holds let go, by the flush below.

The spend counters are what budgets are checked against, so that each
gateway sees what the others spent. They are hot, rebuildable state: PostgreSQL's ledger
is the record. ``add_many`` (a recorder consumer) sums settled requests per
tenant and window in memory; a background task adds the sums to Redis every
``interval_s`` in one pipeline. Sums Redis did not take stay and go with the
next flush, so a Redis outage delays them rather than losing them (at most a
reply lost after Redis applied it counts twice: budgets then err on the safe
side). ``rebuild`` raises each counter to the ledger's figure (never lowers
it): after Redis lost its data, or on demand (``tollway db rebuild-counters``).

Keys (``P`` the prefix, default ``tollway``; a hash per tenant and window)::

    {P:spend:<tenant>}:day:YYYYMMDD    requests, cost_nanos, cost_loaded_nanos, held
    {P:spend:<tenant>}:month:YYYYMM    the same for the calendar month
    {P:spend:<tenant>}:key:<id>:day:YYYYMMDD (and :month:) a managed key's own
    {P:spend:<tenant>}:holds           zset: hold id -> expiry (ms)
    {P:spend:<tenant>}:hold            hash: hold id -> "amount window-key..."
    {P:spend:<tenant>}:rate:<scope>:<kind>   a GCRA arrival time (ms); scope
                                       "tenant" or "key:<id>", kind requests|tokens

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
from cache.scripts import Arg, Script
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


# Admission: rate limits and budget reservations in one atomic call. Every key
# of a call shares the tenant's hash tag.
# KEYS: holds (zset rid -> expiry ms), hold (hash rid -> "amount key key..."), then
# the budget windows, then the rate limits' keys (each a GCRA "theoretical arrival
# time" in ms). ARGV: now ms, rid, amount (nano-dollars), hold expiry ms, ttl s,
# the number of windows, one limit per window (nano-dollars of loaded cost), then
# per rate key: units this request takes, ms per unit (60000 / the per-minute
# limit), period ms (60000: a full minute's units may come at once).
# Holds past their expiry (a gateway died holding them) are let go first. Nothing
# is written unless everything has room; an admitted request's hold is recorded
# (with no window when it only took rate units: its record is what lets its unused
# tokens come back, once). Returns {admitted, refused kind (0 none,
# 1 budget, 2 rate), refused index (1-based), retry ms, remaining per window...,
# arrival time per rate key...}: remaining is the window's limit minus spent minus
# held (this request's hold included when admitted).
_RELEASE = """
local function release(rid)
  local h = redis.call('HGET', KEYS[2], rid)
  redis.call('ZREM', KEYS[1], rid)
  if not h then return false end
  local amount = nil
  for part in string.gmatch(h, '%S+') do
    if amount == nil then amount = tonumber(part)
    else redis.call('HINCRBY', part, 'held', -amount) end
  end
  redis.call('HDEL', KEYS[2], rid)
  return true
end
"""
ADMIT = Script(
    _RELEASE
    + """
local now = tonumber(ARGV[1])
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do release(rid) end
local amount = tonumber(ARGV[3])
local nwin = tonumber(ARGV[6])
local kind, index, retry = 0, 0, 0
local remaining, tats = {}, {}
for j = 1, #KEYS - 2 - nwin do
  local base = 6 + nwin + (j - 1) * 3
  local units, per = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local period = tonumber(ARGV[base + 3])
  local tat = math.max(tonumber(redis.call('GET', KEYS[2 + nwin + j]) or '0'), now)
  local after = tat + units * per
  if after - now > period then
    if kind == 0 then kind, index, retry = 2, j, after - now - period end
    tats[j] = tat
  else
    tats[j] = after
  end
end
for i = 1, nwin do
  local v = redis.call('HMGET', KEYS[2 + i], 'cost_loaded_nanos', 'held')
  local left = tonumber(ARGV[6 + i]) - tonumber(v[1] or '0') - tonumber(v[2] or '0')
  if kind == 0 and left < amount then kind, index = 1, i end
  remaining[i] = left
end
local reply = {kind == 0 and 1 or 0, kind, index, math.ceil(retry)}
if kind == 0 then
  for j = 1, #tats do
    local period = tonumber(ARGV[6 + nwin + j * 3])
    local ttl = math.ceil(tats[j] - now + period)
    redis.call('SET', KEYS[2 + nwin + j], tostring(tats[j]), 'PX', ttl)
  end
  local hold = ARGV[3]
  for i = 1, nwin do
    redis.call('HINCRBY', KEYS[2 + i], 'held', amount)
    redis.call('EXPIRE', KEYS[2 + i], ARGV[5])
    remaining[i] = remaining[i] - amount
    hold = hold .. ' ' .. KEYS[2 + i]
  end
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], hold)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
for i = 1, nwin do reply[#reply + 1] = remaining[i] end
for j = 1, #tats do reply[#reply + 1] = math.floor(tats[j]) end
return reply
"""
)
# KEYS: holds, hold, then the rate keys tokens go back to. ARGV: the number of holds,
# then per hold: its id, m, and m pairs (the index in KEYS of a rate key, the ms to
# take off its arrival time: tokens taken but not used). A hold's tokens come back
# only if the hold was still there: a flush sent again after Redis applied it (its
# reply lost), or a hold Redis never took, gives nothing back.
RELEASE = (
    _RELEASE
    + """
local back, i = {}, 2
for _ = 1, tonumber(ARGV[1]) do
  local held = release(ARGV[i])
  local m = tonumber(ARGV[i + 1])
  if held then
    for k = 1, m do
      local j = tonumber(ARGV[i + 2 * k])
      back[j] = (back[j] or 0) + tonumber(ARGV[i + 2 * k + 1])
    end
  end
  i = i + 2 + 2 * m
end
for j, ms in pairs(back) do
  local tat = redis.call('GET', KEYS[j])
  if tat then redis.call('SET', KEYS[j], tostring(tonumber(tat) - ms), 'KEEPTTL') end
end
return 1
"""
)
RELEASE_BATCH = 500  # holds per release call: bounds how long one call blocks Redis


class RateCharge(NamedTuple):
    """What one request takes from one rate limit (GCRA)."""

    key: str
    units: int  # 1 request, or tokens reserved
    per_unit_ms: float  # 60000 / the per-minute limit
    period_ms: int = 60_000


class Admission(NamedTuple):
    """The admission call's outcome."""

    admitted: bool
    refused: tuple[str, int] | None  # ("budget" | "rate", index), when not admitted
    retry_after_ms: int  # a rate refusal: when the units will be there
    remaining_nanos: tuple[int, ...]  # per budget window: limit - spent - held
    arrival_ms: tuple[int, ...]  # per rate charge: its arrival time after this request


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


def rate_key(prefix: str, tenant: str, key_id: str, kind: str) -> str:
    """A rate limit's GCRA state: the tenant's (``key_id`` "") or a key's; ``kind``
    ``requests`` or ``tokens``."""
    scope = f"key:{key_id}" if key_id else "tenant"
    return f"{spend_tag(prefix, tenant)}:rate:{scope}:{kind}"


# A settled hold to let go: its id, and per rate key the ms its unused tokens give back.
Release = tuple[str, list[tuple[str, float]]]


class SpendCounters:
    PREFIX = "tollway"

    def __init__(self, redis: RedisClient, *, interval_s: float = 0.2):
        self.redis = redis
        self.prefix = self.PREFIX
        self.interval_s = interval_s
        self._pending: dict[str, Sums] = {}  # key -> sums not yet in Redis
        self._releases: dict[str, list[Release]] = {}  # by tenant: holds to let go
        # hold id -> (tenant, rate keys to give tokens back to, with ms per token and
        # tokens taken), while its request holds budget or tokens
        self._holding: dict[str, tuple[str, list[tuple[str, float, int]]]] = {}
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
            held = self._holding.pop(report.hold_id, None) if report.hold_id else None
            if held is not None:  # its spend first, then its hold: counted twice a moment
                tenant, tokens = held
                used = report.usage.total_tokens
                back = [(key, (taken - used) * per) for key, per, taken in tokens if taken > used]
                self._releases.setdefault(tenant, []).append((report.hold_id, back))

    def holding(
        self, hold_id: str, tenant: str, tokens: list[tuple[str, float, int]] | None = None
    ) -> None:
        """A request holds a reservation ``hold_id`` (and ``tokens``: rate keys, ms per
        token, tokens taken): let it go, and give back the tokens it did not use, when its
        report (``RequestReport.hold_id``) is counted."""
        self._holding[hold_id] = (tenant, tokens or [])

    def forget(self, hold_id: str) -> None:
        """The admission refused ``hold_id``: nothing to let go."""
        self._holding.pop(hold_id, None)

    async def admit(
        self,
        tenant: str,
        hold_id: str,
        amount_nanos: int,
        windows: Sequence[tuple[str, int]],
        rates: Sequence[RateCharge],
        hold_s: float,
    ) -> Admission | None:
        """In one atomic call shared by every gateway: take the request's units from every
        rate limit and hold ``amount_nanos`` in every budget window (key, limit), or
        nothing if any lacks room. None if Redis did not answer."""
        now_ms = int(time.time() * 1000)
        keys = [*hold_keys(self.prefix, tenant), *(key for key, _ in windows)]
        keys += [r.key for r in rates]
        argv: list[Arg] = [now_ms, hold_id, amount_nanos, now_ms + int(hold_s * 1000), TTL_S]
        argv.append(len(windows))
        argv += [limit for _, limit in windows]
        for rate in rates:
            argv += [rate.units, rate.per_unit_ms, rate.period_ms]

        async def run(redis: Redis) -> list[Any]:
            result: list[Any] = await ADMIT(redis, keys, argv)
            return result

        result = await self.redis.call("budget.admit", run, None)
        if result is None:
            return None
        admitted, kind, index, retry, *rest = (int(v) for v in result)
        refused = None if not kind else ("budget" if kind == 1 else "rate", index - 1)
        spare = tuple(rest[: len(windows)])
        return Admission(bool(admitted), refused, retry, spare, tuple(rest[len(windows) :]))

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
        """Add the pending sums to Redis, then let go of the settled requests' holds (one
        call per tenant and ``RELEASE_BATCH`` holds); False (both kept for the next flush)
        if it failed. Cancelled meanwhile (the gateway stopping), both are kept too."""
        if not self._pending and not self._releases:
            return True
        batch, self._pending = self._pending, {}
        releases, self._releases = self._releases, {}

        async def add(redis: Redis) -> bool:
            pipe = redis.pipeline(transaction=False)
            for key, sums in batch.items():
                for field_name, value in zip(FIELDS, sums, strict=True):
                    if value:
                        pipe.hincrby(key, field_name, value)
                pipe.expire(key, TTL_S)
            for tenant, holds in releases.items():
                for start in range(0, len(holds), RELEASE_BATCH):
                    keys, argv = self._release_call(tenant, holds[start : start + RELEASE_BATCH])
                    # A pipeline cannot fall back from EVALSHA: the text, once per batch.
                    pipe.eval(RELEASE, len(keys), *keys, *argv)
            await pipe.execute()
            return True

        try:
            done = await self.redis.call("spend.add", add, False, budget_s=2.0)
        except asyncio.CancelledError:
            self._keep(batch, releases)
            raise
        if not done:
            self._keep(batch, releases)
        return done

    def _release_call(self, tenant: str, holds: Sequence[Release]) -> tuple[list[str], list[Arg]]:
        """RELEASE's keys and arguments for ``holds`` of ``tenant``."""
        rate_keys: dict[str, int] = {}  # rate key -> its index in KEYS (1-based)
        argv: list[Arg] = [len(holds)]
        for hold_id, back in holds:
            argv += [hold_id, len(back)]
            for key, ms in back:
                argv += [rate_keys.setdefault(key, 3 + len(rate_keys)), ms]
        return [*hold_keys(self.prefix, tenant), *rate_keys], argv

    def _keep(self, batch: dict[str, Sums], releases: dict[str, list[Release]]) -> None:
        """A flush that did not go through: its sums and releases go with the next."""
        for key, sums in batch.items():  # added to what came since
            self._pending[key] = self._pending.get(key, Sums()) + sums
        for tenant, holds in releases.items():  # let go after the spend (else counted twice)
            self._releases.setdefault(tenant, []).extend(holds)

    async def rebuild(self, ledger: Mapping[str, Sums], budget_s: float = 10.0) -> bool:
        """Raise each counter named in ``ledger`` (key -> the ledger's sums) to at least
        its figure, and mark Redis as holding them (``lost``); False if Redis did not take
        it."""

        async def apply(redis: Redis) -> bool:
            pipe = redis.pipeline(transaction=False)
            for key, sums in ledger.items():
                pipe.eval(RAISE, 1, key, TTL_S, *sums)  # one key a call: cluster-safe
            pipe.set(self.mark, int(time.time()))
            await pipe.execute()
            return True

        return await self.redis.call("spend.rebuild", apply, False, budget_s=budget_s)

    @property
    def mark(self) -> str:
        """Set when the counters were rebuilt from the ledger: a Redis without it lost them
        (restarted empty, flushed) or never had them."""
        return f"{{{self.prefix}:spend}}:rebuilt"

    async def lost(self) -> bool | None:
        """Whether Redis lost the counters since they were last rebuilt; None if it did
        not answer."""

        async def check(redis: Redis) -> bool:
            return not await redis.exists(self.mark)

        return await self.redis.call("spend.check", check, None)
