"""The usage ledger: every metered request recorded in Redis, and the sums read back.

``record`` is what the request path calls: synchronous and O(1), it puts the
request's figures on a bounded in-memory queue and returns. A background
writer drains the queue in batches, one pipeline per batch; a full queue or a
batch that fails twice is counted as lost (``on_lost``), never raised.

Sums are integers, so they are exact: dollars as nano-dollars (the headers'
nine decimals), GPU-time as micro-seconds (the headers' six decimals). The
usage API's totals are the exact sum of the headers its requests carried.

This module owns ``UsageLedger``: the queue, the writer task and the queries.
The key schema and how a batch becomes Redis writes are in
``cache.ledger_write``; the rows a query returns and their grouping are in
``cache.ledger_rows`` (re-exported here).

Queries have hour granularity: every hour bucket that overlaps
``[start, end)`` counts whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from cache import ledger_write as keys
from cache.ledger_rows import GroupBy, UsageRow, group_rows, hours_between, totals
from cache.ledger_write import APPLY, _TagWrite, build_writes, clean
from cache.redis_client import RedisClient
from metering.budget import WindowSpend, utc
from metering.money import from_nanos
from metering.pricing import Cost
from metering.report import RequestReport

__all__ = ["GroupBy", "LedgerUnavailable", "UsageLedger", "UsageRow", "totals"]

log = logging.getLogger("tollway.ledger")


def _ignore_lost(count: int) -> None:
    pass


class LedgerUnavailable(Exception):
    """Redis did not answer a usage query: the usage API answers 503, not zeros."""


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
        batch_size: int = 5000,
        linger_s: float = 1.0,
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
        self._queue: deque[RequestReport] = deque()
        self._wake = asyncio.Event()
        self._seq = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._busy = False  # a batch is being written

    # -- keys --------------------------------------------------------------

    def hour_tag(self, hour: str) -> str:
        return keys.hour_tag(self.prefix, hour)

    def tenant_hash(self, hour: str, tenant: str) -> str:
        return keys.tenant_hash(self.prefix, hour, tenant)

    def spend_tag(self, tenant: str) -> str:
        return keys.spend_tag(self.prefix, tenant)

    def stream_key(self) -> str:
        return keys.stream_key(self.prefix)

    # -- the request path --------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    def record(self, report: RequestReport) -> None:
        """Queue one finished request (dated by its ``finished_us``). Never blocks, never raises.

        The report is read later, by the writer: it must not change after this.
        """
        self.record_many((report,))

    def record_many(self, items: Sequence[RequestReport]) -> None:
        """``record`` for a batch of reports: one wake-up for them all."""
        room = 0 if self._closed else max(self.max_queue - len(self._queue), 0)
        kept = items if len(items) <= room else items[:room]
        if len(kept) < len(items):
            self._lose(len(items) - len(kept))
        if kept:
            self._queue.extend(kept)
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
                # Linger so a busy gateway writes one large batch a second instead
                # of a round trip per request: a batch costs ~0.5 ms of CPU before
                # its first row (redis-py, three EVALs), so at 1 s (~1,000 rows at
                # 1,000 req/s) that is under a microsecond a request.
                await asyncio.sleep(self.linger_s)
            taken = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._busy = True
            try:
                await self._write_batch(taken)
            except asyncio.CancelledError:
                self._lose(len(taken))
                raise
            except Exception:
                # A bug, not an outage: keep the writer alive for the next batch.
                log.exception("the ledger writer failed on a batch of %d", len(taken))
                self._lose(len(taken))
            finally:
                self._busy = False

    async def _write_batch(self, taken: list[RequestReport]) -> None:
        """Write, retry once after the client's backoff, else count the batch lost."""
        bad: list[RequestReport] = []
        writes = self._build(taken, bad.append)
        if bad:
            for report in bad:
                log.error("cannot record request %s in the ledger: %r", report.request_id, report)
            self._lose(len(bad))
            if len(bad) == len(taken):
                return
        seq = next(self._seq)
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(self.retry_delay_s)
            if await self._apply(writes, seq):
                self.written += len(taken) - len(bad)
                return
        self._lose(len(taken) - len(bad))

    async def _apply(self, writes: list[_TagWrite], seq: int) -> bool:
        """One pipeline: one Lua call per hash tag. False if Redis failed (nothing raised)."""

        async def apply(redis: Redis) -> bool:
            pipe = redis.pipeline(transaction=False)
            for write in writes:
                pipe.eval(APPLY, len(write.keys), *write.keys, *write.args(self.writer_id, seq))
            await pipe.execute()
            return True

        return await self.redis.call("ledger.write", apply, False, budget_s=self.write_budget_s)

    def _build(
        self,
        batch: list[RequestReport],
        on_bad: Callable[[RequestReport], None] = lambda report: None,
    ) -> list[_TagWrite]:
        """The batch as integer sums per hash tag: one HINCRBY per distinct field."""
        return build_writes(
            batch,
            prefix=self.prefix,
            ttl=self.retention_s,
            stream_maxlen=self.stream_maxlen,
            on_bad=on_bad,
        )

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
        window = hours_between(max(utc(start), oldest), min(utc(end), newest))
        hours = [h.strftime("%Y%m%d%H") for h in window]
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
            pairs = [(h, clean(tenant)) for h in hours]
        if not pairs:
            return []
        hashes = await self._read(
            "ledger.query",
            lambda pipe: [pipe.hgetall(self.tenant_hash(h, t)) for h, t in pairs],
        )
        return group_rows(group_by, pairs, hashes)

    async def spend(self, tenant: str, now: datetime) -> WindowSpend | None:
        """The tenant's spend in the UTC day and month containing ``now``; None if Redis fails."""
        now = utc(now)
        tag = self.spend_tag(clean(tenant))
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
        day, month = (Cost.of_usd(from_nanos(_int(m)), from_nanos(_int(lo))) for m, lo in result)
        return WindowSpend(day, month)
