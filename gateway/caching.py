"""The response cache as the pipeline uses it: plan, look up, store.

``plan`` reads the request's ``Cache-Control`` and ``x-tollway-cache-ttl``,
applies the tier's policy (``always | deterministic | never``) and, when the
answer may be looked up or stored, computes the key from the tenant, the
resolved model and the fields that change the output (``cache.cache_key``).
It runs before the gateway touches the body. ``lookup`` and ``store`` go
through the fail-open Redis client: an outage is a miss and no store.

Identical requests in flight are coalesced (``join_flight``/``end_flight``, over
``cache.singleflight``): one leader goes upstream, the others wait for its
stored answer and report ``x-tollway-cache: coalesced`` at zero cost.

Hot entries are kept in the process for ``cache.local_ttl_s`` (``LocalEntries``),
saving the Redis round trip a hit would otherwise wait for.

Only complete answers are stored (every choice finished with stop, length or
a tool call); errors and aborted streams never are. Streams are stored once
they end, assembled into the same completion object a non-streaming request
gets, so either kind of request can hit the other's entry.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cache.cache_control import (
    CacheControl,
    CacheDecision,
    InvalidCacheHeader,
    Policy,
    decide,
    parse_cache_control,
)
from cache.cache_key import cache_digest
from cache.response_cache import CachedResponse, ResponseCache, storable
from cache.singleflight import Follower, Leader, SingleFlight
from gateway.config import CacheConfig
from gateway.errors import InvalidRequest
from metering.report import RequestReport

log = logging.getLogger("tollway.caching")


@dataclass(eq=False, slots=True)
class CachePlan:
    control: CacheControl
    decision: CacheDecision
    digest: str | None  # None when the request bypasses the cache

    @property
    def status(self) -> str:
        """``x-tollway-cache`` for a request that goes upstream."""
        return "miss" if self.decision.lookup else "bypass"


class CacheLayer:
    def __init__(
        self,
        cache: ResponseCache,
        config: CacheConfig,
        policies: dict[str, Policy],
        flights: SingleFlight | None = None,
        on_event: Callable[[str, str], None] = lambda tier, result: None,
    ):
        self.on_event = on_event  # (tier, hit|miss|bypass|coalesced): for metrics
        self.cache = cache
        self.config = config
        self.policies = policies  # by tier
        self.flights = flights if config.coalesce else None
        self.local = LocalEntries(config.local_max_entries, config.local_ttl_s)

    def plan(
        self,
        headers: Mapping[str, str],
        *,
        tenant: str,
        tier: str,
        model: str,
        endpoint: str,
        body: Mapping[str, Any],
    ) -> CachePlan:
        try:
            control = parse_cache_control(
                headers.get("cache-control"),
                headers.get("x-tollway-cache-ttl"),
                max_ttl_s=self.config.max_ttl_s,
            )
        except InvalidCacheHeader as exc:
            raise InvalidRequest(str(exc), param=exc.header, code="invalid_header") from None
        decision = decide(self.policies[tier], body, control)
        digest = None
        if decision.lookup or decision.store:
            digest = cache_digest(tenant, model, endpoint, body)
        return CachePlan(control, decision, digest)

    async def lookup(self, plan: CachePlan) -> CachedResponse | None:
        if not plan.decision.lookup or plan.digest is None:
            return None
        now = time.time()
        entry = self.local.get(plan.digest)
        if entry is None:
            entry = await self.cache.get(plan.digest, max_age_s=None, now=now)
            if entry is None:
                return None
            self.local.put(plan.digest, entry)
        max_age = plan.control.max_age
        if max_age is not None and entry.age_s(now) > max_age:
            return None
        return entry

    async def join_flight(self, plan: CachePlan) -> CachedResponse | Leader | None:
        """After a miss: lead the upstream call (``Leader``), or wait for the one in flight.

        A follower gets the leader's stored answer (coalesced), or becomes the
        leader if the last one failed or stored nothing, or after
        ``coalesce_wait_s`` goes upstream itself (None): nobody hangs on a
        dead leader. Only requests whose answer may be looked up coalesce.
        """
        if self.flights is None or not plan.decision.lookup or plan.digest is None:
            return None
        flight = await self.flights.acquire(plan.digest)
        if isinstance(flight, Leader):
            return flight
        if not isinstance(flight, Follower):
            return None  # Redis unavailable: go on uncoalesced

        async def stored() -> CachedResponse | None:
            return await self.lookup(plan)

        result = await self.flights.wait(
            plan.digest, timeout_s=self.config.coalesce_wait_s, result=stored
        )
        return result if isinstance(result, CachedResponse | Leader) else None

    async def end_flight(self, plan: CachePlan, flight: CachedResponse | Leader | None) -> None:
        """The leader is done (answer stored or not): followers may look now."""
        if isinstance(flight, Leader) and self.flights is not None and plan.digest is not None:
            await self.flights.release(plan.digest, flight.token)

    def keep(
        self, plan: CachePlan, completion: dict[str, Any], report: RequestReport
    ) -> CachedResponse | None:
        """A complete answer the plan may store, held in the process at once (so this
        gateway's next identical request hits even before Redis has it); None if not."""
        if not plan.decision.store or plan.digest is None or not storable(completion):
            return None
        entry = CachedResponse(
            completion=completion,
            stored_at=time.time(),
            endpoint=report.operation,
            cost_usd=report.cost.marginal,
            cost_loaded_usd=report.cost.loaded,
            prompt_tokens=report.usage.prompt_tokens,
            completion_tokens=report.usage.completion_tokens,
        )
        self.local.put(plan.digest, entry)
        return entry

    async def persist(self, plan: CachePlan, entry: CachedResponse) -> bool:
        """Write a kept answer to Redis, for every gateway; False when it was not stored."""
        assert plan.digest is not None
        ttl = plan.control.ttl_s or self.config.default_ttl_s
        return await self.cache.put(plan.digest, entry, ttl_s=ttl)

    async def store(
        self, plan: CachePlan, completion: dict[str, Any], report: RequestReport
    ) -> bool:
        """``keep`` then ``persist``."""
        entry = self.keep(plan, completion, report)
        return entry is not None and await self.persist(plan, entry)


class LocalEntries:
    """Recently seen cache entries, in this process, for ``ttl_s`` (LRU, bounded).

    Entries are immutable for a key (the key covers everything that changes the
    answer), so holding one briefly is safe; the only cost is that an entry can
    be served up to ``ttl_s`` after it expired in Redis.
    """

    def __init__(self, max_entries: int, ttl_s: float):
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()

    def get(self, digest: str) -> CachedResponse | None:
        if self.ttl_s <= 0:
            return None
        found = self._entries.get(digest)
        if found is None:
            return None
        expires, entry = found
        if time.monotonic() >= expires:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry

    def put(self, digest: str, entry: CachedResponse) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[digest] = (time.monotonic() + self.ttl_s, entry)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
