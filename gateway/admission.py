"""Continuous-batching admission: a slot per request, a fair queue per tier, shedding.

vLLM runs up to ``max_num_seqs`` sequences in one continuous batch and queues
the rest internally, where nobody can reorder, reroute or shed them. So the
gateway never sends a replica more requests than it has slots: vLLM's batch
stays full and its own waiting queue stays empty, and the surplus waits here.

- **Slots.** ``acquire`` grants a ``Slot`` on the least-loaded available
  replica of the tier that has one free (``TierPool.best_free``); ``release``
  gives it back (a stream at its last event) and the freed slot goes at once
  to the best waiting request of any tier served by that replica.
- **Order.** Strict priorities first (the key's ``priority``, else the tier's;
  a client may lower its own with ``x-tollway-priority``; retries of a request
  that already held a slot jump ahead). Within a priority, tenants share the
  tier by weight (``scheduling.tenant_weights``) in *slot-seconds*: each
  tenant has a virtual time that grows by the time its requests held slots
  divided by its weight, and the tenant with the smallest goes next. A tenant
  that was idle re-enters at the current virtual time, so idling banks no
  credit, and a tenant of long generations cannot crowd out one of short ones.
  FIFO within a tenant.
- **Deadlines.** A request may wait for a slot until its deadline
  (``scheduling.deadline_ms`` or ``x-tollway-deadline-ms``). A request whose
  predicted wait (queue ahead x mean slot hold time / slots) exceeds it is
  refused at once, and one still waiting at its deadline is refused then:
  429 with ``Retry-After``. So is one arriving at a full queue
  (``max_queue``).
- **Fallback.** ``acquire`` takes the routed tier followed by its
  ``fallback`` tiers: a tier with no available replica, or whose queue would
  outlast the deadline, passes the request to the next one. A request that
  already waited its deadline out is not passed on.
- **Ejection.** Failed upstream attempts eject a replica for a while
  (``ReplicaState.record_failure``); the scheduler re-admits it when the time
  is up and pumps its queue. Waiters of a tier left with no available replica
  are failed over at once instead of waiting out their deadline.

Everything runs on the event loop, so no locks; every state change that can
free capacity (release, re-admission, a health round) calls ``_pump``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import HealthConfig, SchedulingConfig
from gateway.errors import GatewayError, NoHealthyUpstream, Overloaded
from gateway.pool import Pools, ReplicaState, TierPool
from metering.prometheus import GatewayMetrics
from metering.telemetry import INERT, RequestSpan, Step

log = logging.getLogger("tollway.admission")

RETRY_PRIORITY = 1_000  # above any configured priority (-100..100)
HOLD_ALPHA = 0.1  # weight of the newest sample in the mean slot hold time
DEFAULT_HOLD_S = 1.0  # charged at grant until the tier has a measured mean


@dataclass(eq=False, slots=True)
class Ticket:
    """Who is asking, how urgently, and until when (monotonic) a slot is worth having."""

    tenant: str
    priority: int
    deadline: float


@dataclass(eq=False, slots=True)
class Slot:
    """A granted place in a replica's batch; give it back with ``Scheduler.release``."""

    replica: ReplicaState
    pool: TierPool
    key: int  # the replica's occupancy key (GPU-time attribution)
    tenant: str
    granted_at: float
    waited_s: float
    charged_s: float  # slot-seconds charged to the tenant at grant, corrected at release
    fallback: str | None = None  # why not the routed tier: "unavailable" | "deadline"
    released: bool = False


class _Waiter:
    __slots__ = ("enqueued", "future", "priority", "ticket")

    def __init__(self, ticket: Ticket, priority: int, now: float):
        self.ticket = ticket
        self.priority = priority
        self.enqueued = now
        self.future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()


class _Queue:
    """One tier's waiting requests: priority -> tenant -> FIFO, plus its fairness state."""

    def __init__(self, pool: TierPool, weights: dict[str, float]):
        self.pool = pool
        self._weights = weights
        self.lines: dict[int, dict[str, deque[_Waiter]]] = {}
        self.depth = 0
        self.vtime: dict[str, float] = {}  # slot-seconds served / weight
        self.clock = 0.0  # virtual time of the latest grant
        self.hold_s: float | None = None  # mean time a request holds a slot

    def push(self, waiter: _Waiter) -> None:
        tenant = waiter.ticket.tenant
        if not self._backlogged(tenant):  # idle time banks no credit
            self.vtime[tenant] = max(self.vtime.get(tenant, 0.0), self.clock)
        self.lines.setdefault(waiter.priority, {}).setdefault(tenant, deque()).append(waiter)
        self.depth += 1

    def peek(self) -> _Waiter | None:
        """The waiter that goes next: the best ``rank`` among the top priority's tenants."""
        if not self.depth:
            return None
        line = self.lines[max(self.lines)]
        return min((fifo[0] for fifo in line.values()), key=self.rank)

    def rank(self, waiter: _Waiter) -> tuple[int, float, float]:
        """Lower goes first: priority, then its tenant's virtual time, then arrival."""
        return -waiter.priority, self.vtime[waiter.ticket.tenant], waiter.enqueued

    def remove(self, waiter: _Waiter) -> bool:
        line = self.lines.get(waiter.priority)
        fifo = line.get(waiter.ticket.tenant) if line else None
        if fifo is None or waiter not in fifo:
            return False
        fifo.remove(waiter)
        if not fifo:
            del line[waiter.ticket.tenant]  # type: ignore[union-attr]
            if not line:
                del self.lines[waiter.priority]
        self.depth -= 1
        return True

    def drain(self) -> list[_Waiter]:
        waiters = [w for line in self.lines.values() for fifo in line.values() for w in fifo]
        self.lines.clear()
        self.depth = 0
        return waiters

    def charge(self, tenant: str, slot_seconds: float) -> None:
        self.vtime[tenant] = self.vtime.get(tenant, self.clock) + slot_seconds / self._weights.get(
            tenant, 1.0
        )

    def observe_hold(self, seconds: float) -> None:
        mean = self.hold_s
        self.hold_s = seconds if mean is None else mean + HOLD_ALPHA * (seconds - mean)

    def predicted_wait(self, capacity: int) -> float | None:
        """Seconds until a request joining now would get a slot, or None before any sample."""
        if self.hold_s is None or capacity <= 0:
            return None
        return (self.depth + 1) * self.hold_s / capacity

    def _backlogged(self, tenant: str) -> bool:
        return any(tenant in line for line in self.lines.values())


class Scheduler:
    def __init__(
        self,
        pools: Pools,
        config: SchedulingConfig,
        health: HealthConfig,
        metrics: GatewayMetrics | None = None,
    ):
        self.config = config
        self.health = health
        self.metrics = metrics
        self._queues = {pool.name: _Queue(pool, dict(config.tenant_weights)) for pool in pools}
        self._queues_of: dict[str, list[_Queue]] = {}
        for queue in self._queues.values():
            for replica in queue.pool.replicas:
                self._queues_of.setdefault(replica.url, []).append(queue)
        self._tier_label = pools.tier_label
        self._replicas = pools.by_url
        self._readmit: dict[str, asyncio.TimerHandle] = {}
        for queue in self._queues.values():  # every tier's depth exists from the start, at 0
            self._observe_depth(queue)

    def depth(self, tier: str) -> int:
        return self._queues[tier].depth

    # -- acquiring -----------------------------------------------------------

    async def acquire(
        self,
        candidates: Sequence[TierPool],
        ticket: Ticket,
        span: RequestSpan | None = None,
        *,
        exclude: frozenset[int] = frozenset(),
        fallen_from: str | None = None,
    ) -> Slot:
        """A slot on the first of ``candidates`` (routed tier, then fallbacks) that can give one.

        Raises ``Overloaded`` (429) or ``NoHealthyUpstream`` (503) from the last
        tier tried. ``exclude``: ids of replicas to avoid when there is a choice.
        ``fallen_from``: the routed tier, when ``candidates`` are only its fallbacks
        because it lost its last replica while the request was on it.
        """
        reason: str | None = None if fallen_from is None else "unavailable"
        for index, pool in enumerate(candidates):
            last = index == len(candidates) - 1
            try:
                slot = await self._acquire(pool, ticket, span, exclude)
            except NoHealthyUpstream:
                if last:
                    self._count_shed(pool.name, "no_replica")
                    raise
                reason = "unavailable"
            except Overloaded as exc:
                if last or exc.waited:
                    full = exc.instance_code == "queue_full"
                    self._count_shed(pool.name, "queue_full" if full else "deadline")
                    raise
                reason = "deadline"
            else:
                if index or fallen_from is not None:
                    slot.fallback = reason
                    if self.metrics is not None:
                        origin = fallen_from or candidates[0].name
                        self.metrics.fallback(origin, pool.name, reason or "")
                return slot
        raise AssertionError("acquire needs at least one candidate tier")

    async def retry(self, pool: TierPool, ticket: Ticket, exclude: frozenset[int]) -> Slot:
        """A slot for another attempt of a request that already held one: it goes first."""
        # Its deadline was for the first slot; a retry gets at least a second more.
        again = Ticket(ticket.tenant, RETRY_PRIORITY, max(ticket.deadline, time.monotonic() + 1))
        return await self.acquire((pool,), again, exclude=exclude)

    async def _acquire(
        self, pool: TierPool, ticket: Ticket, span: RequestSpan | None, exclude: frozenset[int]
    ) -> Slot:
        now = time.monotonic()
        queue = self._queues[pool.name]
        if not queue.depth:
            replica = pool.best_free(now, exclude)
            if replica is not None:
                return self._grant(queue, replica, ticket.tenant, now, 0.0)
        available = pool.available(now)
        if not available:
            raise NoHealthyUpstream(_no_replica_message(pool))
        capacity = sum(r.slots for r in available)
        predicted = queue.predicted_wait(capacity)
        if queue.depth >= self.config.max_queue:
            raise _overloaded(
                f"Tier '{pool.name}' has {queue.depth} requests waiting, its limit; "
                "try again shortly.",
                predicted,
                code="queue_full",
            )
        remaining = ticket.deadline - now
        if remaining <= 0 or (predicted is not None and predicted > remaining):
            raise _overloaded(
                f"Tier '{pool.name}' cannot start this request within its deadline of "
                f"{max(remaining, 0) * 1000:.0f} ms"
                + (f": about {predicted:.1f} s of queue is ahead of it." if predicted else "."),
                None if predicted is None else predicted - remaining,
            )
        return await self._wait(queue, ticket, span, now, remaining, available)

    async def _wait(
        self,
        queue: _Queue,
        ticket: Ticket,
        span: RequestSpan | None,
        now: float,
        remaining: float,
        available: list[ReplicaState],
    ) -> Slot:
        waiter = _Waiter(ticket, ticket.priority, now)
        queue.push(waiter)
        self._observe_depth(queue)
        for replica in available:  # a slot may be free behind older waiters (foreign load fell)
            if replica.free_slots > 0:
                self._pump(replica, now)
        step = span.child("tollway.queue_wait") if span is not None else INERT
        step.set_attribute("tollway.queue.depth", queue.depth)
        step.set_attribute("tollway.tier", queue.pool.name)
        try:
            async with asyncio.timeout(remaining):
                slot = await waiter.future
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                slot = waiter.future.result()  # granted as the deadline struck: use it
            else:
                self._abandon(queue, waiter, step, "queue_deadline_exceeded")
                raise _overloaded(
                    f"Tier '{queue.pool.name}' could not start this request within its "
                    f"deadline of {remaining * 1000:.0f} ms; the tier is saturated.",
                    queue.predicted_wait(sum(r.slots for r in queue.pool.replicas)),
                    waited=True,
                ) from None
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # granted as the client left
            self._abandon(queue, waiter, step, _error_name(exc))
            raise
        step.set_attribute("tollway.queue.wait_ms", round(slot.waited_s * 1000, 3))
        step.end()
        return slot

    def _abandon(self, queue: _Queue, waiter: _Waiter, step: Step, error: str) -> None:
        if queue.remove(waiter):
            self._observe_depth(queue)
        step.end(error)

    def _grant(
        self, queue: _Queue, replica: ReplicaState, tenant: str, now: float, waited: float
    ) -> Slot:
        key = replica.occupy()
        charged = queue.hold_s or DEFAULT_HOLD_S
        queue.clock = max(queue.clock, queue.vtime.get(tenant, queue.clock))
        queue.charge(tenant, charged)
        if self.metrics is not None:
            self.metrics.observe_queue_wait(queue.pool.name, waited)
        return Slot(replica, queue.pool, key, tenant, now, waited, charged)

    # -- releasing and pumping ----------------------------------------------

    def release(self, slot: Slot) -> float:
        """Give the slot back; returns the GPU-seconds the request was attributed there."""
        if slot.released:
            return 0.0
        slot.released = True
        now = time.monotonic()
        gpu_seconds = slot.replica.vacate(slot.key)
        queue = self._queues[slot.pool.name]
        held = now - slot.granted_at
        queue.observe_hold(held)
        queue.charge(slot.tenant, held - slot.charged_s)
        self._pump(slot.replica, now)
        return gpu_seconds

    def _pump(self, replica: ReplicaState, now: float) -> None:
        """Hand ``replica``'s free slots to the best waiters of the tiers it serves."""
        if not replica.available(now):
            return
        queues = self._queues_of[replica.url]
        while replica.free_slots > 0:
            heads = [(q.rank(w), q, w) for q in queues if (w := q.peek()) is not None]
            if not heads:
                return
            _, queue, waiter = min(heads, key=lambda head: head[0])
            queue.remove(waiter)
            self._observe_depth(queue)
            if waiter.future.done():  # cancelled: its task is unwinding
                continue
            slot = self._grant(queue, replica, waiter.ticket.tenant, now, now - waiter.enqueued)
            waiter.future.set_result(slot)

    def refresh(self) -> None:
        """Capacity may have changed (health round, scrape, re-admission): act on it."""
        now = time.monotonic()
        for queue in self._queues.values():
            if queue.depth and not queue.pool.available(now):
                message = _no_replica_message(queue.pool)
                for waiter in queue.drain():
                    if not waiter.future.done():
                        waiter.future.set_exception(NoHealthyUpstream(message))
                self._observe_depth(queue)
        for replica in self._replicas.values():
            self._pump(replica, now)

    # -- passive health -----------------------------------------------------

    def succeeded(self, replica: ReplicaState) -> None:
        replica.record_success()

    def failed(self, replica: ReplicaState, reason: str, *, at_once: bool = False) -> None:
        """An attempt at ``replica`` failed; past the threshold it is ejected for a while."""
        now = time.monotonic()
        duration = replica.record_failure(reason, self.health, now, at_once=at_once)
        if not duration:
            return
        log.warning("replica %s ejected for %.1f s: %s", replica.url, duration, reason)
        if self.metrics is not None:
            self.metrics.ejection(replica.url, self._tier_label[replica.url])
        pending = self._readmit.pop(replica.url, None)
        if pending is not None:
            pending.cancel()
        loop = asyncio.get_running_loop()
        self._readmit[replica.url] = loop.call_later(duration, self._readmitted, replica)
        self.refresh()

    def _readmitted(self, replica: ReplicaState) -> None:
        self._readmit.pop(replica.url, None)
        log.info("replica %s re-admitted after ejection", replica.url)
        self.refresh()

    def close(self) -> None:
        for handle in self._readmit.values():
            handle.cancel()
        self._readmit.clear()

    # -- metrics ------------------------------------------------------------

    def _observe_depth(self, queue: _Queue) -> None:
        if self.metrics is not None:
            self.metrics.observe_queue(queue.pool.name, queue.depth)

    def _count_shed(self, tier: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.shed(tier, reason)


def _overloaded(
    message: str, retry_in_s: float | None, *, code: str | None = None, waited: bool = False
) -> Overloaded:
    retry_after = max(1, math.ceil(retry_in_s)) if retry_in_s is not None else 1
    return Overloaded(message, retry_after_s=retry_after, code=code, waited=waited)


def _no_replica_message(pool: TierPool) -> str:
    errors = [r.last_error for r in pool.replicas if r.last_error]
    detail = f" (last failure: {errors[-1]})" if errors else ""
    return f"No healthy replica is available for tier '{pool.name}'{detail}."


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return exc.instance_code or exc.code or type(exc).__name__
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
