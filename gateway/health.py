"""Active health checks: poll every replica's ``/health`` and ``/metrics``; keep its state current.

A replica becomes unhealthy after ``unhealthy_after`` failed checks in a row
and healthy again on its first passing check; passive ejection after failed
upstream attempts is the scheduler's (``gateway.admission``). ``/ready`` and
admission read both. Each round also reads vLLM's running/waiting counts and
KV-cache use from ``/metrics`` (``gateway.scrape``); a replica without vLLM
metrics is fine. After each round ``on_round`` lets the scheduler act on any
capacity that appeared or vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp

from gateway.config import HealthConfig
from gateway.pool import Pools, ReplicaState
from gateway.scrape import parse_vllm_load
from gateway.upstream_errors import describe

log = logging.getLogger("tollway.health")


class HealthChecker:
    def __init__(
        self,
        pools: Pools,
        config: HealthConfig,
        session: aiohttp.ClientSession,
        on_round: Callable[[], None] = lambda: None,
    ):
        self.pools = pools
        self.config = config
        self.session = session
        self.on_round = on_round
        self._task: asyncio.Task[None] | None = None

    async def check(self, replica: ReplicaState, *, unhealthy_after: int | None = None) -> None:
        was_healthy = replica.healthy
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with self.session.get(replica.url + "/health") as response:
                    ok = response.status == 200
                    reason = f"/health answered {response.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ok, reason = False, f"/health failed: {describe(exc)}"
        if ok:
            replica.check_passed()
        else:
            threshold = unhealthy_after or self.config.unhealthy_after
            replica.check_failed(reason, unhealthy_after=threshold)
        if ok:
            await self.scrape(replica)
        if replica.healthy != was_healthy:
            state = "healthy again" if replica.healthy else f"unhealthy ({reason})"
            log.warning("replica %s is %s", replica.url, state)

    async def scrape(self, replica: ReplicaState) -> None:
        replica.begin_scrape()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with self.session.get(replica.url + "/metrics") as response:
                    if response.status != 200:
                        return
                    text = await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return  # load figures are a refinement; their absence is not a failure
        load = parse_vllm_load(text)
        if load is not None:
            replica.observe_vllm(load)

    async def check_all(self, *, unhealthy_after: int | None = None) -> None:
        """One round; at start-up ``unhealthy_after=1`` so a dead replica is out at once."""
        checks = (self.check(r, unhealthy_after=unhealthy_after) for r in self.pools.replicas())
        await asyncio.gather(*checks)
        self.on_round()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self.check_all()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tollway-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
