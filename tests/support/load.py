"""A steady load of chat completions through a gateway, and a record of what it was served.

::

    async with Load(gateway.url, KEY, concurrency=12, tag="pg-outage") as load:
        await load.wait_served(100)  # progress, not a sleep
        ...                          # a fault, under load
    load.served                      # request ids answered 200, as the gateway echoed them

``concurrency`` workers share one async ``openai`` client and send one request
after another until the block ends (or ``stop()``). Each request carries its own
``x-request-id`` (``<tag>-<worker>-<n>``: the gateway honours a sane one and
echoes it as ``x-tollway-request-id``), so a test knows the id of every request
it sent, answered or not: the ledger's rows can be compared with them exactly.
Prompts are unique and no temperature is sent, so nothing is answered from the
cache or coalesced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from types import TracebackType

import openai


@dataclass
class Load:
    gateway_url: str
    key: str
    model: str = "sim-small"
    concurrency: int = 12
    tag: str = "load"
    max_tokens: int = 8
    sent: list[str] = field(default_factory=list)  # every id sent, answered or not
    served: list[str] = field(default_factory=list)  # ids answered 200, in answer order
    served_at: list[float] = field(default_factory=list)  # monotonic time of each 200
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    unanswered: collections.Counter[str] = field(default_factory=collections.Counter)
    started_at: float = 0.0  # monotonic time of the first request
    stopped_at: float = 0.0  # monotonic time stop() returned
    _client: openai.AsyncOpenAI | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False

    async def __aenter__(self) -> Load:
        self._client = openai.AsyncOpenAI(
            base_url=self.gateway_url + "/v1",
            api_key=self.key,
            max_retries=0,
            timeout=30,
        )
        self.started_at = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._worker(n), name=f"load-{self.tag}-{n}")
            for n in range(self.concurrency)
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Let every request in flight finish (or fail), then close the client."""
        if self._client is None:
            return
        self._stopping = True
        try:
            async with asyncio.timeout(40):
                await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._client.close()
            self._client = None
            self.stopped_at = time.monotonic()

    async def wait_served(self, count: int, within_s: float = 30.0) -> None:
        """Until ``count`` requests in all have been answered 200."""
        deadline = time.monotonic() + within_s
        while len(self.served) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self.served)} of {count} requests served in {within_s} s; "
                    f"statuses {dict(self.statuses)}, unanswered {dict(self.unanswered)}"
                )
            await asyncio.sleep(0.02)

    def served_between(self, start: float, end: float) -> int:
        """How many requests were answered 200 between two monotonic times."""
        return sum(1 for at in self.served_at if start <= at <= end)

    async def _worker(self, worker: int) -> None:
        assert self._client is not None
        completions = self._client.chat.completions.with_raw_response
        n = 0
        while not self._stopping:
            rid = f"{self.tag}-{worker}-{n}"
            n += 1
            self.sent.append(rid)
            try:
                raw = await completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": f"load {rid}: say something"}],
                    max_tokens=self.max_tokens,
                    extra_headers={"x-request-id": rid},
                )
            except openai.APIStatusError as exc:
                self.statuses[exc.status_code] += 1
                continue
            except openai.APIConnectionError as exc:  # no answer: the gateway is gone
                self.unanswered[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            self.statuses[raw.status_code] += 1
            echoed = raw.headers.get("x-tollway-request-id")
            if echoed != rid:
                raise AssertionError(f"sent x-request-id {rid}, answered as {echoed}")
            self.served.append(rid)
            self.served_at.append(time.monotonic())
