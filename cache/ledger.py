"""The usage ledger: every metered request recorded in Redis, and the sums read back.

``record`` is what the request path calls: synchronous and O(1), it puts the
request's figures on a bounded in-memory queue and returns. A background
writer drains the queue in batches, one pipeline per batch; a full queue or a
batch that fails twice is counted as lost (``on_lost``), never raised.

Sums are integers, so they are exact: dollars as nano-dollars (the headers'
nine decimals), GPU-time as micro-seconds (the headers' six decimals). The
usage API's totals are the exact sum of the headers its requests carried.

Key schema (``P`` is the prefix, default ``tollway``; times are UTC)::

    {P:usage:YYYYMMDDHH}:tenant:<tenant>   hash, one per hour and tenant:
        "<tier>\\t<model>\\t<cache>\\t<metric>" -> integer sum, metric one of
        requests, prompt_tokens, completion_tokens, cached_tokens, gpu_us,
        cost_nanos, cost_loaded_nanos, saved_nanos
    {P:usage:YYYYMMDDHH}:tenants           set: the tenants seen that hour
    {P:spend:<tenant>}:day:YYYYMMDD        hash: requests, cost_nanos, cost_loaded_nanos
    {P:spend:<tenant>}:month:YYYYMM        the same for the calendar month (budgets)
    {P:requests}                           stream: one entry per request, all its
                                           fields, trimmed to ~stream_maxlen entries
    <any tag above>:applied                hash: writer id -> last batch applied

Aggregates expire ``retention_days`` after their last write. The hash tags
keep the keys one write touches together in one cluster slot: an hour's
hashes, a tenant's spend, the stream. A batch is written as one Lua call per
tag, each guarded by that tag's ``applied`` marker (writer id, batch number),
so retrying a batch whose reply was lost (a timeout after Redis applied it)
cannot count it twice.

Queries have hour granularity: every hour bucket that overlaps
``[start, end)`` counts whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from redis.asyncio import Redis

from cache.redis_client import RedisClient
from metering.budget import WindowSpend, utc
from metering.money import from_nanos, to_nanos
from metering.pricing import Cost
from metering.report import RequestReport

log = logging.getLogger("tollway.ledger")

GroupBy = Literal["tenant", "tier", "model", "day", "cache"]
METRICS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "gpu_us",
    "cost_nanos",
    "cost_loaded_nanos",
    "saved_nanos",
)
SPEND_METRICS = ("requests", "cost_nanos", "cost_loaded_nanos")
SEP = "\t"
MARKER_TTL_S = 86_400

# Applies one batch's writes for one hash tag, unless this writer's batch
# number ARGV[2] was already applied there. Ops follow ARGV[3] (the marker TTL):
# h key field n | s key member | e key ttl | x key maxlen "field\tvalue\t..."
# where key is an index into KEYS. A stream entry travels as one tab-terminated
# string: one argument instead of thirty-two is most of the writer's CPU.
_APPLY = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if last >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local i, n = 4, #ARGV
while i <= n do
  local op, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if op == 'h' then
    redis.call('HINCRBY', key, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 's' then
    redis.call('SADD', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'e' then
    redis.call('EXPIRE', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'x' then
    local fields = {}
    for item in string.gmatch(ARGV[i + 3], '([^\t]*)\t') do fields[#fields + 1] = item end
    redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 2], '*', unpack(fields))
    i = i + 4
  else
    return redis.error_reply('tollway ledger: unknown op ' .. tostring(op))
  end
end
return 1
"""


def _ignore_lost(count: int) -> None:
    pass


@functools.lru_cache(maxsize=4096)  # tenants, tiers, models: few, and seen per request
def _clean(name: str) -> str:
    """Names go into keys and tab-separated fields: keep braces and tabs out of them."""
    return name.replace("\t", " ").replace("{", "(").replace("}", ")")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One request's figures, as integers, taken from its report when it is recorded."""

    at: float
    request_id: str
    tenant: str
    tier: str
    model: str
    operation: str
    cache: str
    status: int
    replica: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    gpu_us: int
    cost_nanos: int
    cost_loaded_nanos: int
    saved_nanos: int | None

    @classmethod
    def of(cls, report: RequestReport, at: float) -> _Entry:
        usage = report.usage
        return cls(
            at,
            report.request_id,
            _clean(report.tenant),
            _clean(report.tier),
            _clean(report.model),
            report.operation,
            _clean(report.cache),
            report.status,
            report.replica or "",
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens,
            # The header prints six decimals; sum exactly what it printed.
            _micros(report.gpu_seconds),
            to_nanos(report.cost.marginal),
            to_nanos(report.cost.loaded),
            None if report.saved is None else to_nanos(report.saved),
        )

    def metrics(self) -> tuple[int, ...]:
        return (
            1,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.gpu_us,
            self.cost_nanos,
            self.cost_loaded_nanos,
            self.saved_nanos or 0,
        )

    def stream_line(self) -> str:
        """Every field as ``name\tvalue\t``, for the Lua call to split into an XADD."""
        values = [getattr(self, name) for name in _ENTRY_FIELDS]
        values[0] = f"{self.at:.6f}"
        return "".join(
            f"{name}\t{'' if value is None else str(value).replace(SEP, ' ')}\t"
            for name, value in zip(_ENTRY_FIELDS, values, strict=True)
        )


_ENTRY_FIELDS = tuple(item.name for item in fields(_Entry))


def _micros(seconds: float) -> int:
    """``seconds`` as the integer the header's ``f"{seconds:.6f}"`` spells, exactly."""
    if seconds >= 0:
        return int(f"{seconds:.6f}".replace(".", ""))
    return int(Decimal(f"{seconds:.6f}").scaleb(6))


@functools.lru_cache(maxsize=4096)
def _metric_fields(dims: str) -> tuple[str, ...]:
    return tuple(f"{dims}{SEP}{metric}" for metric in METRICS)


class _TagWrite:
    """The writes of one batch that share a hash tag: the keys and ops of one Lua call."""

    def __init__(self, tag: str) -> None:
        self.keys = [tag + ":applied"]
        self._index: dict[str, int] = {}
        self.ttls: dict[int, int] = {}
        self.ops: list[str | int] = []

    def key(self, key: str, ttl: int | None) -> int:
        """The key's 1-based index in KEYS, adding it (and its TTL) on first use."""
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)
            if ttl is not None:
                self.ttls[index] = ttl
        return index

    def hincrby(self, key: str, ttl: int, field: str, amount: int) -> None:
        if amount:
            self.ops += ["h", self.key(key, ttl), field, amount]

    def sadd(self, key: str, ttl: int, member: str) -> None:
        self.ops += ["s", self.key(key, ttl), member]

    def xadd(self, key: str, maxlen: int, line: str) -> None:
        self.ops += ["x", self.key(key, None), maxlen, line]

    def args(self, writer: str, seq: int) -> list[str | int]:
        expiries: list[str | int] = []
        for index, ttl in self.ttls.items():
            expiries += ["e", index, ttl]
        return [writer, seq, MARKER_TTL_S, *self.ops, *expiries]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Sums for one group (a tenant, tier, model, cache status or UTC day ``YYYY-MM-DD``)."""

    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    gpu_us: int
    cost_usd: Decimal
    cost_loaded_usd: Decimal
    saved_usd: Decimal

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def gpu_seconds(self) -> float:
        return self.gpu_us / 1_000_000

    @classmethod
    def from_sums(cls, key: str, sums: Sequence[int]) -> UsageRow:
        """From the integer sums in ``METRICS`` order (dollars in nano-dollars)."""
        requests, prompt, completion, cached, gpu_us, cost, loaded, saved = sums
        usd = from_nanos
        return cls(
            key, requests, prompt, completion, cached, gpu_us, usd(cost), usd(loaded), usd(saved)
        )

    def sums(self) -> tuple[int, ...]:
        money = (self.cost_usd, self.cost_loaded_usd, self.saved_usd)
        counts = (self.requests, self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        return (*counts, self.gpu_us, *(to_nanos(amount) for amount in money))


class LedgerUnavailable(Exception):
    """Redis did not answer a usage query: the usage API answers 503, not zeros."""


def _hour(at: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(at))


def _hours(start: datetime, end: datetime) -> list[datetime]:
    """The hour buckets that overlap ``[start, end)``."""
    start, end = utc(start), utc(end)
    hour = start.replace(minute=0, second=0, microsecond=0)
    out: list[datetime] = []
    if end <= start:
        return out
    while hour < end:
        out.append(hour)
        hour += timedelta(hours=1)
    return out


def _int(value: Any) -> int:
    return 0 if value is None else int(value)


class UsageLedger:
    """Records reports (``record``) and answers usage and spend queries.

    Owned by the app's lifespan: ``start()`` after the ``RedisClient`` starts,
    ``stop()`` (which writes what is queued) before it closes. ``lost`` and
    ``written`` count requests; ``on_lost(n)`` feeds the lost-writes metric.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "tollway",
        retention_days: int = 400,
        on_lost: Callable[[int], None] = _ignore_lost,
        max_queue: int = 100_000,
        batch_size: int = 500,
        linger_s: float = 0.05,
        stream_maxlen: int = 1_000_000,
        write_budget_s: float = 2.0,
        query_budget_s: float = 10.0,
        retry_delay_s: float | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.retention_s = retention_days * 86_400
        self.retention_days = retention_days
        self.on_lost = on_lost
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.stream_maxlen = stream_maxlen
        self.write_budget_s = write_budget_s
        self.query_budget_s = query_budget_s
        # Wait out the client's short circuit before the one retry.
        self.retry_delay_s = redis.backoff_s + 0.05 if retry_delay_s is None else retry_delay_s
        self.writer_id = uuid.uuid4().hex[:16]
        self.lost = 0
        self.written = 0
        self._queue: deque[tuple[RequestReport, float]] = deque()
        self._wake = asyncio.Event()
        self._seq = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._busy = False  # a batch is being written

    # -- keys --------------------------------------------------------------

    def hour_tag(self, hour: str) -> str:
        return f"{{{self.prefix}:usage:{hour}}}"

    def tenant_hash(self, hour: str, tenant: str) -> str:
        return f"{self.hour_tag(hour)}:tenant:{tenant}"

    def spend_tag(self, tenant: str) -> str:
        return f"{{{self.prefix}:spend:{tenant}}}"

    def stream_key(self) -> str:
        return f"{{{self.prefix}:requests}}"

    # -- the request path --------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    def record(self, report: RequestReport, at: float) -> None:
        """Queue one finished request (``at``: Unix time). Never blocks, never raises.

        The report is read later, by the writer: it must not change after this.
        """
        if self._closed or len(self._queue) >= self.max_queue:
            self._lose(1)
            return
        self._queue.append((report, at))
        self._wake.set()

    def _lose(self, count: int) -> None:
        self.lost += count
        self.on_lost(count)

    # -- the writer --------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tollway-ledger-writer")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Write what is queued (up to ``grace_s``), then stop; what is left is counted lost."""
        self._closed = self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=grace_s)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._queue:
            self._lose(len(self._queue))
            self._queue.clear()

    async def flush(self, within_s: float = 5.0) -> bool:
        """Wait until the queue is written (or lost); False if it is not within ``within_s``."""
        deadline = time.monotonic() + within_s
        while self._queue or self._busy:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self.batch_size and not self._stopping:
                # Linger so a busy gateway writes a few large batches a second
                # instead of a round trip per request (measured: bench/metering).
                await asyncio.sleep(self.linger_s)
            taken = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            batch = self._entries(taken)
            self._busy = True
            try:
                await self._write_batch(batch)
            except asyncio.CancelledError:
                self._lose(len(batch))
                raise
            except Exception:
                # A bug, not an outage: keep the writer alive for the next batch.
                log.exception("the ledger writer failed on a batch of %d", len(batch))
                self._lose(len(batch))
            finally:
                self._busy = False

    def _entries(self, taken: list[tuple[RequestReport, float]]) -> list[_Entry]:
        entries = []
        for report, at in taken:
            try:
                entries.append(_Entry.of(report, at))
            except (ArithmeticError, ValueError, TypeError):
                log.exception("cannot record request %s in the ledger", report.request_id)
                self._lose(1)
        return entries

    async def _write_batch(self, batch: list[_Entry]) -> None:
        """Write, retry once after the client's backoff, else count the batch lost."""
        if not batch:
            return
        writes = self._build(batch)
        seq = next(self._seq)
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(self.retry_delay_s)
            if await self._apply(writes, seq):
                self.written += len(batch)
                return
        self._lose(len(batch))

    async def _apply(self, writes: list[_TagWrite], seq: int) -> bool:
        """One pipeline: one Lua call per hash tag. False if Redis failed (nothing raised)."""

        async def apply(redis: Redis) -> bool:
            pipe = redis.pipeline(transaction=False)
            for write in writes:
                pipe.eval(_APPLY, len(write.keys), *write.keys, *write.args(self.writer_id, seq))
            await pipe.execute()
            return True

        return await self.redis.call("ledger.write", apply, False, budget_s=self.write_budget_s)

    def _build(self, batch: list[_Entry]) -> list[_TagWrite]:
        """The batch as integer sums per hash tag: one HINCRBY per distinct field."""
        ttl = self.retention_s
        by_tag: dict[str, _TagWrite] = {}

        def tag_write(tag: str) -> _TagWrite:
            write = by_tag.get(tag)
            if write is None:
                write = by_tag[tag] = _TagWrite(tag)
            return write

        usage: dict[tuple[str, str], dict[str, int]] = {}
        spend: dict[tuple[str, str], list[int]] = {}
        stream = tag_write(self.stream_key())
        for entry in batch:
            hour = _hour(entry.at)
            sums = usage.setdefault((hour, entry.tenant), {})
            dims = SEP.join((entry.tier, entry.model, entry.cache))
            for field, amount in zip(_metric_fields(dims), entry.metrics(), strict=True):
                sums[field] = sums.get(field, 0) + amount
            for window in (f"day:{hour[:8]}", f"month:{hour[:6]}"):
                counts = spend.setdefault((entry.tenant, window), [0, 0, 0])
                counts[0] += 1
                counts[1] += entry.cost_nanos
                counts[2] += entry.cost_loaded_nanos
            stream.xadd(self.stream_key(), self.stream_maxlen, entry.stream_line())
        for (hour, tenant), sums in usage.items():
            write = tag_write(self.hour_tag(hour))
            write.sadd(f"{self.hour_tag(hour)}:tenants", ttl, tenant)
            key = self.tenant_hash(hour, tenant)
            for field, amount in sums.items():
                write.hincrby(key, ttl, field, amount)
        for (tenant, window), counts in spend.items():
            tag = self.spend_tag(tenant)
            write = tag_write(tag)
            for metric, amount in zip(SPEND_METRICS, counts, strict=True):
                write.hincrby(f"{tag}:{window}", ttl, metric, amount)
        return list(by_tag.values())

    # -- reading -----------------------------------------------------------

    async def _read(self, operation: str, commands: Callable[[Any], object]) -> list[Any]:
        """Run the commands queued by ``commands(pipe)`` in one pipeline; raise if Redis fails."""

        async def run(redis: Redis) -> list[Any] | None:
            pipe = redis.pipeline(transaction=False)
            commands(pipe)
            result: list[Any] = await pipe.execute()
            return result

        result = await self.redis.call(operation, run, None, budget_s=self.query_budget_s)
        if result is None:
            raise LedgerUnavailable(f"redis did not answer {operation}")
        return result

    async def query(
        self,
        *,
        group_by: GroupBy,
        start: datetime,
        end: datetime,
        tenant: str | None,
    ) -> list[UsageRow]:
        """Sums over the hours overlapping ``[start, end)``, one row per group, sorted by key.

        ``tenant=None`` sums every tenant (admin keys). Naive datetimes are UTC.
        Hours older than the retention are not read. Raises ``LedgerUnavailable``.
        """
        oldest = datetime.now(UTC) - timedelta(days=self.retention_days + 1)
        newest = datetime.now(UTC) + timedelta(days=1)  # clock skew, no more
        hours = [
            h.strftime("%Y%m%d%H") for h in _hours(max(utc(start), oldest), min(utc(end), newest))
        ]
        if not hours:
            return []
        if tenant is None:
            members = await self._read(
                "ledger.query",
                lambda pipe: [pipe.smembers(f"{self.hour_tag(h)}:tenants") for h in hours],
            )
            pairs = [
                (h, t.decode()) for h, found in zip(hours, members, strict=True) for t in found
            ]
        else:
            pairs = [(h, _clean(tenant)) for h in hours]
        if not pairs:
            return []
        hashes = await self._read(
            "ledger.query",
            lambda pipe: [pipe.hgetall(self.tenant_hash(h, t)) for h, t in pairs],
        )
        groups: dict[str, list[int]] = {}
        for (hour, name), found in zip(pairs, hashes, strict=True):
            for raw, value in found.items():
                tier, model, cache, metric = raw.decode().split(SEP)
                key = _group_key(group_by, hour, name, tier, model, cache)
                sums = groups.setdefault(key, [0] * len(METRICS))
                sums[METRICS.index(metric)] += int(value)
        return [UsageRow.from_sums(key, groups[key]) for key in sorted(groups)]

    async def spend(self, tenant: str, now: datetime) -> WindowSpend | None:
        """The tenant's spend in the UTC day and month containing ``now``; None if Redis fails."""
        now = utc(now)
        tag = self.spend_tag(_clean(tenant))
        keys = (f"{tag}:day:{now:%Y%m%d}", f"{tag}:month:{now:%Y%m}")

        async def read(redis: Redis) -> list[Any] | None:
            pipe = redis.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, ["cost_nanos", "cost_loaded_nanos"])
            result: list[Any] = await pipe.execute()
            return result

        result = await self.redis.call("ledger.spend", read, None)
        if result is None:
            return None
        day, month = (Cost(from_nanos(_int(m)), from_nanos(_int(lo))) for m, lo in result)
        return WindowSpend(day, month)


def _group_key(group_by: GroupBy, hour: str, tenant: str, tier: str, model: str, cache: str) -> str:
    if group_by == "day":
        return f"{hour[:4]}-{hour[4:6]}-{hour[6:8]}"
    return {"tenant": tenant, "tier": tier, "model": model, "cache": cache}[group_by]


def totals(rows: Iterable[UsageRow], key: str = "total") -> UsageRow:
    """The exact sum of rows: the usage API's ``total`` and the CLI table's last line."""
    sums = [0] * len(METRICS)
    for row in rows:
        sums = [a + b for a, b in zip(sums, row.sums(), strict=True)]
    return UsageRow.from_sums(key, sums)
