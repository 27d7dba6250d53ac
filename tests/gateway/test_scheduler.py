"""The admission scheduler on its own: slots, fair queueing, priorities, deadlines, ejection.

No network: slots are granted and released by hand on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.admission import Scheduler, Slot, Ticket
from gateway.config import HealthConfig, SchedulingConfig, Settings, parse_settings
from gateway.errors import NoHealthyUpstream, Overloaded
from gateway.pool import Pools, TierPool
from gateway.scrape import VllmLoad
from metering.prometheus import GatewayMetrics
from tests.support.metrics import parse, value

SMALL = ["http://127.0.0.1:9101", "http://127.0.0.1:9102"]
LARGE = ["http://127.0.0.1:9201"]


def settings(**scheduling: Any) -> Settings:
    raw = {
        "auth": {
            "keys": [
                {"key": "k" * 12, "tenant": "acme"},
                {"key": "g" * 12, "tenant": "globex"},
            ]
        },
        "tiers": [
            {
                "name": "small",
                "models": ["s"],
                "replicas": [{"url": u, "max_num_seqs": 2} for u in SMALL],
                "fallback": ["large"],
            },
            {"name": "large", "models": ["l"], "replicas": [{"url": LARGE[0], "max_num_seqs": 1}]},
        ],
        "scheduling": scheduling,
        "health": {"eject_after": 2, "ejection_s": 0.05, "max_ejection_s": 0.15},
    }
    return parse_settings(raw, "test")


def build(**scheduling: Any) -> tuple[Scheduler, Pools, GatewayMetrics]:
    config = settings(**scheduling)
    pools = Pools(config)
    metrics = GatewayMetrics()
    return Scheduler(pools, config.scheduling, config.health, metrics), pools, metrics


def ticket(tenant: str = "acme", priority: int = 0, deadline_s: float = 5.0) -> Ticket:
    return Ticket(tenant, priority, time.monotonic() + deadline_s)


async def fill(scheduler: Scheduler, pool: TierPool, n: int) -> list[Slot]:
    return [await scheduler.acquire([pool], ticket()) for _ in range(n)]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_grants_least_loaded_replica_and_never_more_than_its_slots() -> None:
    scheduler, pools, _ = build()
    small = pools.tiers["small"]
    slots = await fill(scheduler, small, 4)
    assert [s.replica.url for s in slots] == [SMALL[0], SMALL[1], SMALL[0], SMALL[1]]
    assert [r.in_flight for r in small.replicas] == [2, 2]
    waiter = asyncio.create_task(scheduler.acquire([small], ticket()))
    await settle()
    assert not waiter.done()
    assert scheduler.depth("small") == 1
    scheduler.release(slots[1])  # frees a slot on SMALL[1]: the waiter gets it at once
    granted = await asyncio.wait_for(waiter, 1)
    assert granted.replica.url == SMALL[1]
    assert granted.waited_s > 0
    assert [r.in_flight for r in small.replicas] == [2, 2]
    assert scheduler.depth("small") == 0


async def test_foreign_load_and_vllm_waiting_steer_the_choice() -> None:
    scheduler, pools, _ = build()
    small = pools.tiers["small"]
    first, second = small.replicas
    first.begin_scrape()
    first.observe_vllm(VllmLoad(running=1, waiting=0, kv_cache_usage=0.1))  # another gateway's
    assert first.foreign == 1
    assert first.free_slots == 1
    slot = await scheduler.acquire([small], ticket())
    assert slot.replica is second  # less loaded once foreign load is counted
    second.begin_scrape()
    second.observe_vllm(VllmLoad(running=1, waiting=0, kv_cache_usage=0.9))  # ours: not foreign
    assert second.foreign == 0


async def test_tenants_share_slots_by_weight_in_slot_seconds() -> None:
    scheduler, pools, _ = build(tenant_weights={"acme": 3, "globex": 1})
    large = pools.tiers["large"]  # one slot: every grant is a scheduling decision
    holder = await scheduler.acquire([large], ticket())
    served: list[str] = []

    async def client(tenant: str) -> None:
        while len(served) < 200:
            slot = await scheduler.acquire([large], ticket(tenant, deadline_s=60))
            served.append(tenant)
            await asyncio.sleep(0.001)  # equal work per request
            scheduler.release(slot)

    tasks = [asyncio.create_task(client(t)) for t in ("acme", "globex") * 4]
    await settle()
    scheduler.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    share = served[:200].count("acme") / 200
    assert 0.75 * 0.9 <= share <= 0.75 * 1.1, share


async def test_idle_tenant_banks_no_credit() -> None:
    scheduler, pools, _ = build()
    large = pools.tiers["large"]
    for _ in range(20):  # acme alone for a while, 1 slot-second each
        slot = await scheduler.acquire([large], ticket("acme"))
        slot.granted_at -= 1
        scheduler.release(slot)
    holder = await scheduler.acquire([large], ticket("acme"))
    order: list[str] = []

    async def one(tenant: str) -> None:
        slot = await scheduler.acquire([large], ticket(tenant, deadline_s=60))
        order.append(tenant)
        await asyncio.sleep(0)
        slot.granted_at -= 1
        scheduler.release(slot)

    tasks = [asyncio.create_task(one(t)) for t in ["globex"] * 4 + ["acme"] * 4]
    await settle()
    scheduler.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # globex arriving late gets no catch-up for the 20 s it was idle: they alternate.
    assert order[:4].count("acme") == 2, order


async def test_priorities_go_first_and_a_retry_first_of_all() -> None:
    scheduler, pools, _ = build()
    large = pools.tiers["large"]
    holder = await scheduler.acquire([large], ticket())
    order: list[str] = []

    async def one(name: str, priority: int) -> None:
        slot = await scheduler.acquire([large], ticket(priority=priority))
        order.append(name)
        scheduler.release(slot)

    tasks = [asyncio.create_task(one("low", -5)), asyncio.create_task(one("normal", 0))]
    tasks.append(asyncio.create_task(one("high", 10)))
    await settle()

    async def retried() -> None:
        slot = await scheduler.retry(large, ticket(priority=-50), frozenset())
        order.append("retry")
        scheduler.release(slot)

    tasks.append(asyncio.create_task(retried()))
    await settle()
    scheduler.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["retry", "high", "normal", "low"]


async def test_predicted_wait_beyond_deadline_is_shed_at_once_with_retry_after() -> None:
    scheduler, pools, metrics = build()
    large = pools.tiers["large"]
    slot = await scheduler.acquire([large], ticket())
    slot.granted_at -= 2.0  # it held its slot 2 s: the tier's mean hold time
    scheduler.release(slot)
    holder = await scheduler.acquire([large], ticket())
    started = time.monotonic()
    with pytest.raises(Overloaded) as err:
        await scheduler.acquire([large], ticket(deadline_s=0.5))
    assert time.monotonic() - started < 0.1  # refused at once, not after waiting
    assert err.value.status == 429
    assert err.value.retry_after_s >= 1
    assert err.value.body()["error"]["code"] == "queue_deadline_exceeded"
    assert "deadline" in err.value.message
    scheduler.release(holder)
    assert _sample(metrics, "tollway_shed_total", tier="large", reason="deadline") == 1


async def test_wait_past_deadline_is_shed_and_leaves_the_queue() -> None:
    scheduler, pools, _metrics = build()
    large = pools.tiers["large"]
    holder = await scheduler.acquire([large], ticket())
    started = time.monotonic()
    with pytest.raises(Overloaded) as err:
        await scheduler.acquire([large], ticket(deadline_s=0.1))
    assert 0.09 < time.monotonic() - started < 1
    assert err.value.waited
    assert err.value.headers()["retry-after"].isdigit()
    assert scheduler.depth("large") == 0
    scheduler.release(holder)
    assert large.replicas[0].in_flight == 0


async def test_full_queue_is_refused() -> None:
    scheduler, pools, metrics = build(max_queue=2)
    large = pools.tiers["large"]
    holder = await scheduler.acquire([large], ticket())
    waiters = [asyncio.create_task(scheduler.acquire([large], ticket())) for _ in range(2)]
    await settle()
    with pytest.raises(Overloaded) as err:
        await scheduler.acquire([large], ticket())
    assert err.value.body()["error"]["code"] == "queue_full"
    assert _sample(metrics, "tollway_shed_total", tier="large", reason="queue_full") == 1
    scheduler.release(holder)
    for waiter in waiters:
        scheduler.release(await asyncio.wait_for(waiter, 1))


async def test_cancelled_waiter_leaves_and_a_slot_granted_as_it_leaves_is_returned() -> None:
    scheduler, pools, _ = build()
    large = pools.tiers["large"]
    replica = large.replicas[0]
    holder = await scheduler.acquire([large], ticket())
    waiter = asyncio.create_task(scheduler.acquire([large], ticket()))
    await settle()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert scheduler.depth("large") == 0
    # Granted and cancelled in the same loop turn: the slot must come back.
    racer = asyncio.create_task(scheduler.acquire([large], ticket()))
    await settle()
    scheduler.release(holder)  # grants the slot to racer...
    racer.cancel()  # ...which is cancelled before it resumes
    await asyncio.gather(racer, return_exceptions=True)
    assert replica.in_flight == 0


async def test_fallback_when_unavailable_or_too_slow() -> None:
    scheduler, pools, metrics = build()
    small, large = pools.tiers["small"], pools.tiers["large"]
    candidates = [small, large]
    now = time.monotonic()
    for replica in small.replicas:
        replica.ejected_until = now + 60
    slot = await scheduler.acquire(candidates, ticket())
    assert slot.pool is large
    assert slot.fallback == "unavailable"
    scheduler.release(slot)
    for replica in small.replicas:
        replica.ejected_until = 0.0
    held = await fill(scheduler, small, 4)
    held[0].granted_at -= 5  # small's mean hold: 5 s
    scheduler.release(held.pop(0))
    held.append(await scheduler.acquire([small], ticket()))
    slot = await scheduler.acquire(candidates, ticket(deadline_s=1))
    assert slot.pool is large
    assert slot.fallback == "deadline"
    assert (
        _sample(
            metrics,
            "tollway_fallbacks_total",
            from_tier="small",
            to_tier="large",
            reason="deadline",
        )
        == 1
    )
    for s in [*held, slot]:
        scheduler.release(s)


async def test_waiters_fail_over_when_their_tier_loses_every_replica() -> None:
    scheduler, pools, _ = build()
    small, large = pools.tiers["small"], pools.tiers["large"]
    held = await fill(scheduler, small, 4)
    waiter = asyncio.create_task(scheduler.acquire([small, large], ticket()))
    await settle()
    for replica in small.replicas:
        replica.healthy = False
    scheduler.refresh()
    slot = await asyncio.wait_for(waiter, 1)
    assert slot.pool is large
    assert slot.fallback == "unavailable"
    alone = asyncio.create_task(scheduler.acquire([small], ticket()))
    with pytest.raises(NoHealthyUpstream):
        await asyncio.wait_for(alone, 1)
    for s in [*held, slot]:
        scheduler.release(s)


async def test_ejection_doubles_then_readmits_on_a_timer() -> None:
    scheduler, pools, metrics = build()
    large = pools.tiers["large"]
    replica = large.replicas[0]
    scheduler.failed(replica, "dropped")
    assert replica.available(time.monotonic())  # eject_after is 2
    scheduler.failed(replica, "dropped")
    assert replica.ejected(time.monotonic())
    waiter = asyncio.create_task(scheduler.acquire([large], ticket()))
    with pytest.raises(NoHealthyUpstream):
        await asyncio.wait_for(waiter, 1)  # nothing to wait for: 503 at once
    await asyncio.sleep(0.08)  # ejection_s 0.05
    assert replica.available(time.monotonic())
    scheduler.failed(replica, "refused", at_once=True)  # second ejection: 0.1 s
    assert replica.ejected_until - time.monotonic() > 0.07
    await asyncio.sleep(0.12)
    assert replica.available(time.monotonic())
    scheduler.failed(replica, "refused", at_once=True)  # third: capped at 0.15
    assert replica.ejected_until - time.monotonic() <= 0.15
    scheduler.succeeded(replica)
    assert replica.ejections == 0
    assert _sample(metrics, "tollway_replica_ejections_total", replica=LARGE[0]) == 3
    scheduler.close()


async def test_readmission_pumps_waiting_requests() -> None:
    scheduler, pools, _ = build()
    small = pools.tiers["small"]
    first, second = small.replicas
    scheduler.failed(first, "refused", at_once=True)  # out for 0.05 s
    held = await fill(scheduler, small, 2)
    assert {s.replica.url for s in held} == {second.url}
    waiter = asyncio.create_task(scheduler.acquire([small], ticket()))
    await settle()
    assert scheduler.depth("small") == 1
    slot = await asyncio.wait_for(waiter, 1)  # the re-admission timer hands it first's slot
    assert slot.replica is first
    assert slot.waited_s >= 0.03
    for s in [*held, slot]:
        scheduler.release(s)
    scheduler.close()


def test_config_rejects_unknown_fallback_and_weights() -> None:
    from gateway.config import ConfigError

    raw: dict[str, Any] = {
        "auth": {"keys": [{"key": "k" * 12, "tenant": "acme"}]},
        "tiers": [
            {"name": "a", "models": ["m"], "replicas": [{"url": SMALL[0]}], "fallback": ["b"]}
        ],
    }
    with pytest.raises(ConfigError, match="fallback 'b' is not another tier"):
        parse_settings(raw, "test")
    raw["tiers"][0]["fallback"] = []
    raw["scheduling"] = {"tenant_weights": {"nobody": 2}}
    with pytest.raises(ConfigError, match="tenant_weights: 'nobody'"):
        parse_settings(raw, "test")
    assert HealthConfig().eject_after == 3
    assert SchedulingConfig().deadline_ms == 30_000


def _sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return value(parse(metrics.render()[0].decode()), name, **labels)
