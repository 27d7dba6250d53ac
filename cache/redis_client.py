"""The gateway's one Redis connection, failing open.

Redis makes the gateway better (cache, idempotency, the shared ledger) but
must never make it fail. Every use goes through ``RedisClient.call``:

- each call has a time budget (default 50 ms); past it, or on any Redis
  error, the call returns the caller's ``default`` (a miss, "not recorded")
  and the request goes on uncached and unprotected;
- every such call is reported to ``on_failure(operation)`` (the gateway
  passes a metric counter) and logged, at most once per ``log_interval_s``;
- after a connection failure or timeout the client skips Redis for
  ``backoff_s`` (the circuit is open: calls return their default at once,
  still counted), so a dead Redis neither gets hammered nor adds its budget
  to every request. Then a single call probes it; when it answers, calls go
  through again. Nothing has to be recreated when Redis comes back: the pool
  reconnects on the next call.

A command error (``ResponseError``, e.g. a wrong type) is counted and logged
like any failure but does not open the circuit: the server is up. Any other
exception raised by ``fn`` is a bug and propagates.

Redis Cluster: ``RedisClient(url, cluster=True)`` talks to a cluster through
``redis.asyncio.cluster.RedisCluster``, discovered from the one node ``url``
names, with the same budgets, circuit and fail-open rule. ``fn`` then gets the
``RedisCluster`` (typed as ``Redis``: the commands the cache uses are the same).
Discovering the nodes and slots, on the first call and the first after an
outage, is bounded by ``discover_timeout_s`` (default 1 s) instead of the
call budget; the calls made meanwhile wait for it.
Rules for callers, which keep single-node Redis and Cluster interchangeable:

- every multi-key operation (a Lua script's ``KEYS``, a transaction, a
  ``MULTI``/``WATCH``, a multi-key command) uses keys with one ``{hash tag}``,
  so they live in one slot; a non-transactional pipeline may span tags (the
  cluster client splits it per node) but is then not atomic;
- Lua scripts touch only keys under the hash tag of their ``KEYS`` (the spend
  scripts read a few more from a hold's record, all under the tenant's tag);
- in cluster mode a cluster that cannot be discovered (no node reachable,
  slots not covered) or answers ``CLUSTERDOWN`` counts as an outage and
  opens the circuit; any other ``RedisClusterException`` from ``fn`` (keys
  of one command in different slots, a slot briefly unserved) is counted
  and logged like a command error. A cross-slot bug therefore fails open
  rather than raising: the cluster tests are where it must be caught.

The cluster client's node pools raise instead of waiting when full, so in
cluster mode a semaphore of ``max_connections`` bounds the calls in flight
(waiting for it counts against the budget, as the pool wait does on one node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

log = logging.getLogger("tollway.redis")

T = TypeVar("T")

DEFAULT_CALL_BUDGET_S = 0.05


def _ignore(operation: str) -> None:
    pass


async def _discover(cluster: RedisCluster) -> None:
    """Discover the cluster's nodes and slots if not yet done (a no-op once done).

    Before discovery redis-py sends a command to a random node, and a burst
    of the MOVED replies that follow makes it reset every connection, the
    burst's own included: so every call discovers first. Discovery
    (``CLUSTER SLOTS``, then ``COMMAND``: ~25 ms on loopback) gets its own
    bound, ``discover_timeout_s``, not the call budget, which it could
    exceed on every attempt and so never finish.
    """
    try:
        await cluster.initialize()
    except RedisClusterException as exc:  # no node reachable, slots not covered
        raise RedisError(f"redis cluster unavailable: {exc}") from exc


class RedisClient:
    """One ``redis.asyncio`` client with a bounded pool, a per-call budget and a short circuit."""

    def __init__(
        self,
        url: str,
        *,
        call_budget_s: float = DEFAULT_CALL_BUDGET_S,
        on_failure: Callable[[str], None] = _ignore,
        backoff_s: float = 1.0,
        log_interval_s: float = 10.0,
        max_connections: int = 64,
        connect_timeout_s: float = 0.5,
        socket_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        cluster: bool = False,
        discover_timeout_s: float = 1.0,
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.discover_timeout_s = discover_timeout_s
        self.call_budget_s = call_budget_s
        self.on_failure = on_failure
        self.backoff_s = backoff_s
        self.log_interval_s = log_interval_s
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.socket_timeout_s = socket_timeout_s
        self._clock = clock
        self._redis: Redis | None = None  # a RedisCluster in cluster mode
        self._cluster: RedisCluster | None = None
        self._slots: asyncio.Semaphore | None = None  # cluster mode: calls in flight
        self._open_until: float | None = None  # circuit open (skip Redis) until this time
        self._probing = False
        self._last_log: float | None = None
        self._unlogged = 0
        self.failures = 0  # every call that returned its default, for tests and /ready

    async def start(self) -> None:
        """Build the pool; does not connect (the first call does), so a down Redis is no error."""
        if self._redis is not None:
            return
        if self.cluster:
            self._start_cluster()
            return
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            # Waiting for a free connection counts against the call budget anyway.
            timeout=None,
            socket_connect_timeout=self.connect_timeout_s,
            socket_timeout=self.socket_timeout_s,
            # Retrying is this class's job (the circuit); redis-py's own retries
            # would spend the budget on a server that is not there.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            driver_info=None,  # no CLIENT SETINFO round trip per connection
        )
        self._redis = Redis.from_pool(pool)

    def _start_cluster(self) -> None:
        # Discovery happens on the first call (and the first after an outage).
        self._cluster = RedisCluster.from_url(
            self.url,
            max_connections=self.max_connections,  # per node
            socket_connect_timeout=self.connect_timeout_s,
            socket_timeout=self.socket_timeout_s,
            # No retry-after-reinitialise: the circuit decides when to try again.
            # MOVED/ASK redirections are still followed.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            driver_info=None,
        )
        self._slots = asyncio.Semaphore(self.max_connections)
        # The cluster client offers the commands the callers use under the same names.
        self._redis = cast(Redis, self._cluster)

    async def close(self) -> None:
        redis, self._redis = self._redis, None
        cluster, self._cluster = self._cluster, None
        self._slots = None
        if cluster is not None:
            await cluster.aclose()
        elif redis is not None:
            await redis.aclose()

    @property
    def available(self) -> bool:
        """False while the circuit is open (Redis recently failed and is being skipped)."""
        return self._open_until is None or self._clock() >= self._open_until

    async def ping(self, budget_s: float | None = None) -> bool:
        async def _ping(redis: Redis) -> bool:
            return bool(await redis.ping())

        return await self.call("ping", _ping, False, budget_s=budget_s)

    async def call(
        self,
        operation: str,
        fn: Callable[[Redis], Awaitable[T]],
        default: T,
        *,
        budget_s: float | None = None,
    ) -> T:
        """``await fn(redis)`` within the budget; ``default`` on any Redis error, timeout or skip.

        In cluster mode ``redis`` is the ``RedisCluster`` client; keys that
        one command, script or transaction touches must share a hash tag.

        ``operation`` names the use (``cache.get``, ``ledger.write``...) for the
        failure metric and the log. ``budget_s`` overrides the per-call budget
        for work off the request path (the ledger's batch writes, usage queries).
        """
        redis = self._redis
        if redis is None:
            raise RuntimeError("RedisClient.call before start()")
        probe = False
        if self._open_until is not None:
            if self._clock() < self._open_until or self._probing:
                self._failed(operation, None)
                return default
            self._probing = probe = True
        budget = self.call_budget_s if budget_s is None else budget_s
        cluster, slots = self._cluster, self._slots
        try:
            if cluster is not None:
                async with asyncio.timeout(max(budget, self.discover_timeout_s)):
                    await _discover(cluster)
            async with asyncio.timeout(budget):
                if slots is None:
                    result = await fn(redis)
                else:
                    async with slots:
                        result = await fn(redis)
        except ClusterDownError as exc:  # a ResponseError, but the slots are unusable
            self._open_until = self._clock() + self.backoff_s
            self._failed(operation, exc)
            return default
        except (ResponseError, RedisClusterException) as exc:
            # The server (or the cluster, once discovered) is up: the command
            # was wrong, or its keys span slots, or one slot is briefly unserved.
            self._failed(operation, exc)
            if probe:
                self._close_circuit()
            return default
        except (RedisError, OSError, TimeoutError) as exc:
            self._open_until = self._clock() + self.backoff_s
            self._failed(operation, exc)
            if cluster is None:
                # The idle pooled connections date from before the failure: after a
                # Redis restart each would fail once and reopen the circuit. Drop them.
                with contextlib.suppress(Exception):
                    await redis.connection_pool.disconnect(inuse_connections=False)
            return default
        finally:
            if probe:
                self._probing = False
        if self._open_until is not None:
            self._close_circuit()
        return result

    def _close_circuit(self) -> None:
        self._open_until = None
        log.info("redis at %s answers again", self.url)

    def _failed(self, operation: str, exc: BaseException | None) -> None:
        self.failures += 1
        self.on_failure(operation)
        now = self._clock()
        if self._last_log is not None and now - self._last_log < self.log_interval_s:
            self._unlogged += 1
            return
        if exc is None:
            reason = "skipped: redis failed moments ago"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning(
            "redis %s failed, going on without it (%s); %d more failures since the last log",
            operation,
            reason,
            self._unlogged,
        )
        self._last_log = now
        self._unlogged = 0
