"""In-flight coalescing: of identical cacheable requests in flight, one goes upstream.

The response cache answers a request whose twin has finished; this module
covers the twin that is still running. The first request for a cache digest
takes a lock in Redis and becomes the ``Leader``; every identical request that
arrives meanwhile, on any gateway process sharing Redis, is a ``Follower``
that waits for the leader's result to appear in the response cache::

    flight = await singleflight.acquire(digest)
    if isinstance(flight, Follower):
        flight = await singleflight.wait(digest, timeout_s=..., result=lookup)
        # the cached response, a Leader (this request takes over) or None
    if isinstance(flight, Leader):
        async with singleflight.renewer(digest, flight.token):
            ...  # go upstream, store in the response cache
        await singleflight.release(digest, flight.token)  # in a finally

Key schema (``P`` is the prefix, default ``tollway``)::

    P:flight:{<digest>}   string: the leader's token, expiring after lease_s
                          unless renewed; deleted by the leader when done

The hash tag is the response cache entry's (``P:cache:{<digest>}``), so the
lock and the entry it guards live in one cluster slot.

No one hangs on a failed leader. A leader that finishes (stored or not)
deletes the lock; a leader that dies stops renewing and the lock expires
after at most ``lease_s``. A follower that finds the lock gone looks the
result up (``result()``, the lead passes the response-cache lookup); if
nothing was stored, exactly one follower wins ``SET NX`` and becomes the new
leader while the others keep waiting. Past ``timeout_s`` a follower gets
None and goes upstream itself.

Waiting is polling, not pub/sub: a follower checks the lock every ``poll_s``,
backing off by half each time up to ``max_poll_s`` (with jitter so that
followers spread out). One ``EXISTS`` per poll is cheap, needs no
connection held open per waiter, and works the same on Redis Cluster.

Redis unavailable: ``acquire`` says ``Unprotected`` and ``wait`` returns None
at once, so the request goes upstream uncoalesced; nothing raises.

``lease_renewer`` is the background renewal both this module and
``cache.idempotency`` use for their leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from redis.asyncio import Redis

from cache.redis_client import RedisClient
from cache.scripts import Script

log = logging.getLogger("tollway.singleflight")

T = TypeVar("T")

# Compare-and-delete / compare-and-extend: only the token's holder may.
_RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)
_RENEW = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
)


@dataclass(frozen=True, slots=True)
class Leader:
    """This request goes upstream; it must ``release(digest, token)`` when done."""

    token: str


@dataclass(frozen=True, slots=True)
class Follower:
    """An identical request is in flight: ``wait`` for its result."""


@dataclass(frozen=True, slots=True)
class Unprotected:
    """Redis did not answer: go upstream without coalescing."""


def new_token() -> str:
    return secrets.token_hex(16)


def backoff(delay: float, cap: float) -> float:
    """The next poll interval: half as long again, at most ``cap``."""
    return min(delay * 1.5, cap)


def jittered(delay: float) -> float:
    # Waiters that started together should not poll together.
    return delay * random.uniform(0.75, 1.25)


@contextlib.asynccontextmanager
async def lease_renewer(
    renew: Callable[[], Awaitable[bool | None]], every_s: float, what: str
) -> AsyncIterator[None]:
    """Call ``renew()`` every ``every_s`` in a background task held for the block.

    ``renew`` returns True (extended), False (the lease is no longer ours:
    stop) or None (Redis did not answer: try again next time). The task is
    cancelled and awaited on exit, however the block ends.
    """
    task = asyncio.create_task(_renew(renew, every_s, what), name=f"renew {what}")
    try:
        yield
    finally:
        task.cancel()
        # asyncio.wait, not ``await task``: a cancellation of this block's own
        # task must propagate, not be swallowed with the renewer's.
        await asyncio.wait([task])


async def _renew(renew: Callable[[], Awaitable[bool | None]], every_s: float, what: str) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            kept = await renew()
        except Exception:
            log.exception("renewing the lease on %s failed", what)
            return
        if kept is False:
            log.warning("the lease on %s was lost; no longer renewing it", what)
            return


class SingleFlight:
    """One upstream call per cache digest at a time, across gateway processes."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "tollway",
        lease_s: float = 30.0,
        poll_s: float = 0.01,
        max_poll_s: float = 0.1,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_poll_s = max(max_poll_s, poll_s)

    def lock_key(self, digest: str) -> str:
        return f"{self.prefix}:flight:{{{digest}}}"

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    async def acquire(self, digest: str) -> Leader | Follower | Unprotected:
        """Become the leader for ``digest``, or learn that another request is."""
        token = new_token()
        taken = await self._take(digest, token, "flight.acquire")
        if taken is None:
            return Unprotected()
        return Leader(token) if taken else Follower()

    async def wait(
        self,
        digest: str,
        *,
        timeout_s: float,
        result: Callable[[], Awaitable[T | None]],
    ) -> T | Leader | None:
        """Wait for the leader: its stored result, a ``Leader`` (take over) or None.

        None means "go upstream yourself": past ``timeout_s``, or Redis failed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = self.poll_s
        key = self.lock_key(digest)

        async def held(redis: Redis) -> bool:
            return bool(await redis.exists(key))

        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(jittered(delay), remaining))
            delay = backoff(delay, self.max_poll_s)
            in_flight = await self.redis.call("flight.poll", held, None)
            if in_flight is None:
                return None
            if in_flight:
                continue
            found = await result()
            if found is not None:
                return found
            # The leader is gone and stored nothing: one of us runs next.
            token = new_token()
            taken = await self._take(digest, token, "flight.takeover")
            if taken is None:
                return None
            if taken:
                return Leader(token)

    async def release(self, digest: str, token: str) -> bool:
        """Drop the lock if ``token`` still holds it; after storing the result, or on failure."""

        async def release(redis: Redis) -> bool:
            return bool(await _RELEASE(redis, [self.lock_key(digest)], [token]))

        return await self.redis.call("flight.release", release, False)

    def renewer(self, digest: str, token: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Keep the lock while the block runs: extend it every ``lease_s / 3``."""

        async def renew() -> bool | None:
            return await self._renew(digest, token)

        return lease_renewer(renew, self.lease_s / 3, f"flight {digest[:12]}")

    async def _renew(self, digest: str, token: str) -> bool | None:
        async def renew(redis: Redis) -> bool:
            return bool(await _RENEW(redis, [self.lock_key(digest)], [token, self._lease_ms]))

        return await self.redis.call("flight.renew", renew, None)

    async def _take(self, digest: str, token: str, operation: str) -> bool | None:
        """SET NX the lock: True if taken, False if held by another, None if Redis failed."""

        async def take(redis: Redis) -> Literal["taken", "held"]:
            won = await redis.set(self.lock_key(digest), token, nx=True, px=self._lease_ms)
            return "taken" if won else "held"

        taken = await self.redis.call(operation, take, "failed")
        return None if taken == "failed" else taken == "taken"
