"""Finished requests, counted off the request path, a batch at a time.

A request must be priced before it is answered (its headers carry the
price), but counting it can wait a moment: the Prometheus cells and the
usage ledger's queue. ``Recorder.add``
is all the request path pays: the queue list's own ``append``; a relayed
answer's report is not even made then, its figures kept compact in C until
the batch (``Recorder.log``, ``metering.native``). A background
task hands what has gathered to every consumer every ``linger_s`` (the
gateway's is ``ledger.write_interval_s``, 1 s: the ledger writes each batch
as it comes), one loop per consumer over the whole batch. A batch's code runs
cold, whatever its size, so fewer, larger batches cost less per request: at
0.1 s, counting cost the metered gateway about 1.5 points of CPU more than
at 1 s (bench/RESULTS.md, 2026-11-23, session 7).

Over a batch, the consumers read the reports column by column
(``metering.batch``: one C-level transposition), tens of instructions per
request and field, where the same steps on each request's path were a Python
call and an addition per figure (bench/RESULTS.md, the metering runs of
2026-11-23).

``GET /metrics`` drains first, so a scrape counts every request answered
before it; ``stop()`` drains last, before the ledger stops. ``/v1/usage``
lags the answers by up to about ``ledger.write_interval_s`` (1 s), plus the
write itself. Everything runs on the event loop's thread: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from metering.native import record_log
from metering.report import RequestReport

log = logging.getLogger("tollway.recorder")

Consumer = Callable[[Sequence[RequestReport]], None]


class Recorder:
    def __init__(self, consumers: Sequence[Consumer], *, linger_s: float = 0.1):
        self.consumers = list(consumers)
        self.linger_s = linger_s
        self._pending: list[RequestReport] = []
        # Queue one finished request's report; never blocks, never raises. The
        # list's own append: no Python frame per request.
        self.add: Callable[[RequestReport], None] = self._pending.append
        # Relayed answers' reports, kept compact by the C step until a drain makes them
        # (``metering.native``); None without the extension.
        self.log: Any = record_log() if record_log is not None else None
        self._task: asyncio.Task[None] | None = None

    def drain(self) -> None:
        """Hand everything queued to every consumer now; a failing consumer loses only its part.

        The batch is the reports ``add`` queued, then those the log kept.
        """
        logged = self.log is not None and len(self.log) > 0
        if not self._pending and not logged:
            return
        batch = self._pending.copy()
        self._pending.clear()  # the same list: ``add`` stays bound to it
        if logged:
            batch += self.log.take()
        for consume in self.consumers:
            try:
                consume(batch)
            except Exception:  # a consumer's bug must not stop the others, nor the loop
                log.exception("recording %d finished requests in %r failed", len(batch), consume)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tollway-recorder")

    async def stop(self) -> None:
        """Stop the task and drain what is left (before the ledger stops, so it writes it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.drain()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.linger_s)
            self.drain()
