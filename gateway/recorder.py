"""Settled requests' reports, counted off the request path, a batch at a time.

A request is priced before it is answered (its headers carry the price);
counting it can wait a moment. ``Recorder.add`` queues the report (the
settlement's last step); a background task hands what has gathered to every
consumer (Prometheus, the spend counters, the ledger's spool) every
``linger_s`` (the gateway's is ``ledger.sync_interval_s``, 0.2 s: what a
SIGKILL can lose of the ledger, see docs/ledger.md).

``GET /metrics`` drains first, so a scrape counts every request answered
before it; ``stop()`` drains last, before the ledger stops. ``/v1/usage``
lags the answers by about ``ledger.sync_interval_s`` plus
``ledger.write_interval_s``. Everything runs on the event loop's thread: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from metering.report import RequestReport

log = logging.getLogger("tollway.recorder")

Consumer = Callable[[Sequence[RequestReport]], None]


class Recorder:
    def __init__(self, consumers: Sequence[Consumer], *, linger_s: float = 0.1):
        self.consumers = list(consumers)
        self.linger_s = linger_s
        self._pending: list[RequestReport] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, report: RequestReport) -> None:
        """Queue one settled request's report; never blocks, never raises."""
        self._pending.append(report)

    def drain(self) -> None:
        """Hand everything queued to every consumer now; a failing consumer loses only its part."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
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
