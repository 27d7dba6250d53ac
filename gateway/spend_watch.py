"""Budgets that hold when Redis loses its data: spend counters rebuilt from the ledger.

Redis's spend counters are hot state; PostgreSQL's ledger is the record
(``ledger.counters``). A Redis that restarts empty, or is flushed, would give
every tenant its spent budget back. So each gateway rebuilds the counters at
its start, when the schema is known good, and then checks every
``interval_s`` whether Redis still holds them (``SpendCounters.lost``: the
mark the last rebuild left is gone); if not, it rebuilds them at once (and
keeps trying while the database does not answer). Two
gateways that both notice rebuild twice, which only raises counters to the
same figures. What the ledger does not have yet (rows in a spool, sums not
yet flushed) is what a rebuild can miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cache.spend import SpendCounters
from ledger import counters
from ledger.database import UNREACHABLE, Pool

log = logging.getLogger("tollway.spend_watch")


class SpendWatch:
    def __init__(self, spend: SpendCounters, database: Pool, *, interval_s: float):
        self.spend = spend
        self.database = database
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def rebuild(self) -> bool:
        """Raise Redis's spend counters to the ledger's; False if either did not answer."""
        try:
            async with self.database.acquire() as conn:
                rebuilt = await counters.rebuild(conn, self.spend)
        except UNREACHABLE as exc:  # ConnectionError (Redis) is an OSError too
            log.warning("spend counters not rebuilt from the ledger: %s", exc)
            return False
        log.info("spend counters rebuilt from the ledger: %d day and month sums", rebuilt)
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tollway-spend-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not await self.spend.lost():
                continue
            log.warning("Redis does not hold the spend counters (restarted empty?): rebuilding")
            try:
                await self.rebuild()
            except Exception:  # a schema problem, say: logged, and tried again next time
                log.exception("spend counters not rebuilt from the ledger")
