"""Budgets reserved before work, across gateways, and what Redis being down does to them.

Real processes throughout: this module's own Redis, two simulator replicas
(tier ``small`` and tier ``large``, 64 slots each), gateway processes started
per test (no database: budgets live in Redis, ``cache.spend``), and the async
``openai`` SDK as the client. Each test has its own tenants.

- A burst worth ~3x a tenant's daily budget, fired at once across two
  gateways sharing one Redis after a quiet moment, each request far smaller
  than the budget: the metered spend stays within 1.1x the budget, every refusal is a 429
  ``budget_exceeded`` (Retry-After, the remaining budget), and once the burst
  has settled no hold is left in Redis.
- Requests that share a client's ``x-request-id`` (a client retrying with the
  id it sent before): each is held against the budget, and none leaves a hold
  behind.
- A gateway SIGKILLed while its requests hold budget: the holds block the
  other gateway, then expire within ``reservations.hold_s`` (+1 s), and the
  room comes back.
- Redis stopped: a tenant that fails closed gets a 503 in OpenAI's shape, one
  that fails open (by its own policy or the documented default) is served and
  counted in ``tollway_budget_unchecked_total``; a tenant without a budget is
  served either way.

A managed key's own budget needs PostgreSQL: ``tests/gateway/test_managed_keys.py``
(``test_a_keys_own_budget_is_enforced``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from gateway.config import ReservationConfig
from tests.conftest import FAST_SIM, gateway_config, reset_sim, set_faults
from tests.support.metrics import scrape, value
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.redis_server import RedisServer, run_redis

SLOTS = 64  # per replica, in the simulators and the gateways: no request waits in a queue
MAX_TOKENS = 24  # FAST_SIM answers 8 to 24 tokens: a reservation's worst case is real
REMAINING = "x-tollway-budget-remaining-usd"
LOADED = "x-tollway-cost-loaded-usd"
# The burst's budget; the burst's size is chosen from the cost measured just before it.
BURST_BUDGET = Decimal("0.0006")
BURST_SIZES = (150, 300)
QUIET_S = 3.0  # between the measuring burst and the budgeted one
# The unobserved rate, set explicitly: tests below size budgets in worst cases at it.
UNOBSERVED_USD_PER_MTOK = 20.0


def key_of(tenant: str) -> str:
    return f"sk-test-{tenant}-key"


@dataclass
class World:
    redis: RedisServer
    small: Proc
    large: Proc
    log_dir: Path


@pytest.fixture(scope="module")
def world(log_dir: Path) -> Iterator[World]:
    with run_redis() as server:
        sims: list[Proc] = []
        try:
            for model in ("sim-small", "sim-large"):
                sims.append(start_sim(log_dir, [model], "--max-num-seqs", str(SLOTS), *FAST_SIM))
            yield World(server, sims[0], sims[1], log_dir)
        finally:
            for sim in sims:
                sim.stop()


@pytest.fixture
def fresh(world: World) -> Iterator[World]:
    """The world with the simulators' faults cleared before and after the test."""
    for sim in (world.small, world.large):
        reset_sim(sim)
    yield world
    for sim in (world.small, world.large):
        reset_sim(sim)


def config(
    world: World,
    tenants: list[str],
    budgets: dict[str, dict[str, Any]] | None = None,
    *,
    reservations: dict[str, Any] | None = None,
    redis_url: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A two-tier gateway on this module's simulators, one key per tenant, no database."""
    out = gateway_config(
        [world.small.url], [world.large.url], redis_url or world.redis.url, **overrides
    )
    for tier in out["tiers"]:
        for replica in tier["replicas"]:
            replica["max_num_seqs"] = SLOTS
    out["auth"]["keys"] += [{"key": key_of(t), "tenant": t} for t in tenants]
    out["budgets"] = budgets or {}
    out["reservations"] = {
        "unobserved_usd_per_mtok": UNOBSERVED_USD_PER_MTOK,
        **(reservations or {}),
    }
    return out


def gateway(world: World, procs: list[Proc], cfg: dict[str, Any]) -> Proc:
    started = start_gateway(world.log_dir, cfg)
    procs.append(started)
    return started


def client(gw: Proc, tenant: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=key_of(tenant), max_retries=0, timeout=30
    )


@dataclass
class Outcome:
    """What a set of requests got: each 200's loaded cost, each refusal, each lost answer."""

    costs: list[Decimal] = field(default_factory=list)
    refusals: list[openai.APIStatusError] = field(default_factory=list)
    lost: int = 0  # no answer at all (the gateway died)

    @property
    def spent(self) -> Decimal:
        return sum(self.costs, Decimal(0))

    def statuses(self) -> dict[int, int]:
        counted = Counter(e.status_code for e in self.refusals)
        if self.costs:
            counted[200] = len(self.costs)
        return dict(counted)


async def ask(
    sdk: openai.AsyncOpenAI,
    prompt: str,
    out: Outcome,
    *,
    model: str = "sim-small",
    max_tokens: int = MAX_TOKENS,
    request_id: str | None = None,
) -> None:
    try:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            extra_headers={"x-request-id": request_id} if request_id else None,
        )
    except openai.APIStatusError as exc:
        out.refusals.append(exc)
        return
    except openai.APIConnectionError:
        out.lost += 1
        return
    raw.parse()
    out.costs.append(Decimal(raw.headers[LOADED]))


async def burst(gateways: list[Proc], tenant: str, count: int, tag: str, **kwargs: Any) -> Outcome:
    """``count`` requests fired at once, split evenly across ``gateways``."""
    clients = [client(gw, tenant) for gw in gateways]
    out = Outcome()
    try:
        await asyncio.gather(
            *(
                ask(clients[n % len(clients)], f"{tag} {n}: say something", out, **kwargs)
                for n in range(count)
            )
        )
    finally:
        for sdk in clients:
            await sdk.close()
    return out


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body  # the SDK unwraps OpenAI's {"error": {...}}
    return body


def assert_budget_exceeded(exc: openai.APIStatusError) -> None:
    error = error_of(exc)
    kind = (exc.status_code, error.get("type"), error.get("code"))
    assert kind == (429, "insufficient_quota", "budget_exceeded"), (kind, error)
    assert "daily budget" in error["message"], error
    assert "resets at" in error["message"], error
    assert int(exc.response.headers["retry-after"]) >= 1
    assert Decimal(exc.response.headers[REMAINING]) >= 0


# -- what Redis holds ------------------------------------------------------------------------


def day_key(tenant: str) -> str:
    return "{tollway:spend:" + tenant + "}" + f":day:{datetime.now(UTC):%Y%m%d}"


@dataclass(frozen=True)
class Holds:
    held: int  # the ``held`` field of the tenant's day hash (nano-dollars)
    entries: int  # the hold hash's fields (request id -> amount and windows)
    expiries_ms: tuple[float, ...]  # the holds zset's scores

    @property
    def none(self) -> bool:
        return self.held == self.entries == len(self.expiries_ms) == 0


def holds(world: World, tenant: str) -> Holds:
    tag = "{tollway:spend:" + tenant + "}"
    with redis.Redis.from_url(world.redis.url, decode_responses=True) as r:
        return Holds(
            int(r.hget(day_key(tenant), "held") or 0),
            int(r.hlen(f"{tag}:hold")),
            tuple(s for _, s in r.zrange(f"{tag}:holds", 0, -1, withscores=True)),
        )


def spent_in_redis(world: World, tenant: str) -> Decimal:
    with redis.Redis.from_url(world.redis.url, decode_responses=True) as r:
        nanos = int(r.hget(day_key(tenant), "cost_loaded_nanos") or 0)
    return Decimal(nanos) / 10**9


async def settled_holds(world: World, tenant: str, within_s: float = 3.0) -> tuple[Holds, float]:
    """Until the tenant holds nothing (or ``within_s``: settled requests' holds go with
    the next flushes, ``ledger.sync_interval_s`` apart): the last look, and how long."""
    started = time.monotonic()
    while True:
        seen = await asyncio.to_thread(holds, world, tenant)
        if seen.none or time.monotonic() - started > within_s:
            return seen, time.monotonic() - started
        await asyncio.sleep(0.05)


def unchecked(gw: Proc, tenant: str) -> float:
    return value(scrape(gw.url), "tollway_budget_unchecked_total", tenant=tenant)


# -- a burst across two gateways -------------------------------------------------------------


async def test_burst_across_two_gateways_stays_within_the_budget(
    fresh: World, procs: list[Proc]
) -> None:
    world = fresh
    tenant, warm = "burst", "burst-warm"
    budget = BURST_BUDGET
    cfg = config(world, [tenant, warm], {tenant: {"daily_usd": float(budget)}})
    gateways = [gateway(world, procs, cfg) for _ in range(2)]
    # The same burst first for a tenant without a budget: it measures what a request of
    # the burst costs, and each gateway's estimate learns the tier's cost per token from
    # it. (A lone request on an idle replica carries the replica's idle time: its loaded
    # cost is tens of times a busy one's, and no measure of a burst.)
    warmed = await burst(gateways, warm, 200, "warm")
    assert warmed.statuses() == {200: 200}, [error_of(e) for e in warmed.refusals]
    cost = warmed.spent / 200
    count = min(max(round(3 * budget / cost), BURST_SIZES[0]), BURST_SIZES[1])

    await asyncio.sleep(QUIET_S)  # a burst comes after a quiet moment, as bursts do
    started = time.monotonic()
    out = await burst(gateways, tenant, count, "burst")
    took = time.monotonic() - started
    left, settled_s = await settled_holds(world, tenant)
    spent, accepted, refused = out.spent, len(out.costs), len(out.refusals)
    in_redis = await asyncio.to_thread(spent_in_redis, world, tenant)
    unchecked_by_gateway = [await asyncio.to_thread(unchecked, gw, tenant) for gw in gateways]
    print(
        f"\nburst of {count} across 2 gateways in {took:.2f} s: budget ${budget}, "
        f"worth ${count * cost:.6f} ({count * cost / budget:.2f}x; ${cost:.9f} a request, "
        f"measured by a like burst; ${spent / max(accepted, 1):.9f} an accepted one); "
        f"spent ${spent} = {spent / budget:.3f}x the budget; "
        f"{accepted} accepted, {refused} refused, served unchecked per gateway "
        f"{unchecked_by_gateway}; Redis counts ${in_redis}; left held {left} "
        f"{settled_s:.2f} s after"
    )
    for exc in out.refusals:
        assert_budget_exceeded(exc)
    assert out.lost == 0
    assert accepted > 0
    assert refused > 0  # the burst did run into the budget
    assert cost < budget / 20  # each request far smaller than the budget
    assert spent <= budget * Decimal("1.1"), (
        f"spent {spent / budget:.2f}x the budget; served unchecked (Redis taken for down) "
        f"per gateway: {unchecked_by_gateway}"
    )
    assert unchecked_by_gateway == [0, 0]  # Redis was up throughout
    assert left.none, left
    assert in_redis == spent  # every answer counted once


# -- requests that share an x-request-id -----------------------------------------------------


async def test_requests_sharing_an_x_request_id_are_each_held(
    fresh: World, procs: list[Proc]
) -> None:
    """A client that sends its next request with the id of one still running (its own
    retry after a timeout, or an id it reuses): the second is held too, not waved through."""
    world = fresh
    tenant = "shared-id"
    sharing = 15
    # Room for a few worst cases at the unobserved rate (20 USD/Mtok): the gateway's
    # estimate is the messages' JSON bytes // 4 + 1, plus max_tokens.
    prompt_json = json.dumps([{"role": "user", "content": "retry 0"}], separators=(",", ":"))
    worst = Decimal((len(prompt_json) // 4 + 1 + MAX_TOKENS) * 20) / 1_000_000
    budget = Decimal("0.0024")
    room = int(budget / worst)
    gw = gateway(world, procs, config(world, [tenant], {tenant: {"daily_usd": float(budget)}}))
    set_faults(world.large, added_latency_ms=1000)  # the first still runs at the last
    sdk = client(gw, tenant)
    out = Outcome()
    try:
        tasks = []
        for n in range(sharing):
            request = ask(sdk, f"retry {n}", out, model="sim-large", request_id="client-rid-1")
            tasks.append(asyncio.create_task(request))
            await asyncio.sleep(0.04)
        await asyncio.gather(*tasks)
    finally:
        await sdk.close()
    left, _ = await settled_holds(world, tenant)
    print(
        f"\n{sharing} requests 40 ms apart with one x-request-id, budget ${budget} "
        f"({room} worst cases): {out.statuses()}, spent ${out.spent} = "
        f"{out.spent / budget:.2f}x; left held {left}"
    )
    for exc in out.refusals:
        assert_budget_exceeded(exc)
    # Each is held (a shared id once waved all 15 through): the spend stays in the budget.
    # (More than ``room`` may be served: those that settle give back what they did not use.)
    assert out.refusals, (room, out.statuses())
    # Not the 1.1x bound here: the replica runs 1 s slower than anything the estimate has
    # seen, so a request costs more than its hold (measured up to 1.18x); the bound is
    # the burst test's, on a replica that behaves as it did lately.
    assert len(out.costs) < sharing
    assert left.none, left


async def test_a_reused_x_request_id_leaves_no_hold(fresh: World, procs: list[Proc]) -> None:
    """Requests with one id, at once or one after another: once all settled nothing is
    held, and the budget's room is what was spent leaves."""
    world = fresh
    at_once, in_a_row = "same-id-at-once", "same-id-in-a-row"
    budgets = {t: {"daily_usd": 1.0} for t in (at_once, in_a_row)}
    gw = gateway(world, procs, config(world, [at_once, in_a_row], budgets))
    together = Outcome()
    sdk = client(gw, at_once)
    try:
        await asyncio.gather(
            *(ask(sdk, f"together {n}", together, request_id="client-rid-2") for n in range(3))
        )
    finally:
        await sdk.close()
    row = Outcome()
    sdk = client(gw, in_a_row)
    try:
        for n in range(2):  # the second before the first's hold is let go (a flush later)
            await ask(sdk, f"again {n}", row, request_id="client-rid-3")
    finally:
        await sdk.close()
    left = {t: (await settled_holds(world, t))[0] for t in (at_once, in_a_row)}
    print(
        f"\none x-request-id: 3 at once {together.statuses()}, 2 in a row "
        f"{row.statuses()}; left held {left}"
    )
    assert together.statuses() == {200: 3}
    assert row.statuses() == {200: 2}
    assert left[at_once].none, left[at_once]
    assert left[in_a_row].none, left[in_a_row]


# -- a gateway killed while holding budget ---------------------------------------------------


async def test_holds_of_a_sigkilled_gateway_expire_within_hold_s(
    fresh: World, procs: list[Proc]
) -> None:
    world = fresh
    tenant, hold_s, hanging = "crash", 3.0, 4
    # Each hanging request holds 20 USD/Mtok x (1000 + a short prompt's ~10 tokens), about
    # $0.0202 (nothing observed yet): 4 leave less room than a fifth needs, none leaves room.
    cfg = config(
        world,
        [tenant],
        {tenant: {"daily_usd": 0.1}},
        reservations={"hold_s": hold_s},
        upstream={"first_byte_timeout_s": 60, "total_timeout_s": 120, "max_attempts": 1},
    )
    doomed, survivor = gateway(world, procs, cfg), gateway(world, procs, cfg)
    set_faults(world.large, added_latency_ms=60_000)
    sdk = client(doomed, tenant)
    lost = Outcome()
    tasks = [
        asyncio.create_task(ask(sdk, f"hang {n}", lost, model="sim-large", max_tokens=1000))
        for n in range(hanging)
    ]
    try:
        deadline = time.monotonic() + 5
        while len((seen := await asyncio.to_thread(holds, world, tenant)).expiries_ms) < hanging:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
        os.killpg(doomed.popen.pid, signal.SIGKILL)
        killed_at, killed_ms = time.monotonic(), time.time() * 1000
        doomed.popen.wait(5)
        right_after = await asyncio.to_thread(holds, world, tenant)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # none left but on a failure above
        await sdk.close()
    assert lost.lost == hanging  # the dead gateway answered none of them
    assert right_after.entries == hanging, right_after
    assert right_after.held > 0, right_after
    # Each expires hold_s after it was taken, at most hold_s after the kill.
    assert all(0 < ms - killed_ms <= hold_s * 1000 for ms in right_after.expiries_ms), (
        right_after.expiries_ms,
        killed_ms,
    )

    sdk = client(survivor, tenant)
    tries = Outcome()
    try:
        await ask(sdk, "blocked", tries, max_tokens=1000)  # the dead gateway's holds count
        assert tries.statuses() == {429: 1}, tries.statuses()
        while not tries.costs:  # each try lets expired holds go first
            assert time.monotonic() - killed_at < hold_s + 5, "the dead gateway's holds stayed"
            await asyncio.sleep(0.1)
            await ask(sdk, "fits again", tries, max_tokens=1000)
        released_s = time.monotonic() - killed_at
    finally:
        await sdk.close()
    left, _ = await settled_holds(world, tenant)
    print(
        f"\n{hanging} holds (${right_after.held / 1e9:.6f}) of a gateway SIGKILLed: the "
        f"other gateway refused {len(tries.refusals)} times, then had the room back "
        f"{released_s:.2f} s after the kill (hold_s {hold_s})"
    )
    for exc in tries.refusals:
        assert_budget_exceeded(exc)
    assert released_s <= hold_s + 1
    # Expired holds are let go by the tenant's next admission (its first step): what is
    # left now has expired, and the next request's admission clears it.
    now_ms = time.time() * 1000
    assert all(ms <= now_ms for ms in left.expiries_ms), (left, now_ms)
    sdk = client(survivor, tenant)
    try:
        await ask(sdk, "after", Outcome(), max_tokens=8)
    finally:
        await sdk.close()
    left, _ = await settled_holds(world, tenant)
    assert left.none, left  # the survivor's own holds went at their settlement


# -- Redis down ------------------------------------------------------------------------------


async def test_redis_down_fails_open_or_closed_by_tenant(fresh: World, procs: list[Proc]) -> None:
    world = fresh
    assert ReservationConfig().on_redis_down == "fail_open"  # the documented default
    tenants = ["opens", "closes", "defaults", "unbudgeted"]
    budgets: dict[str, dict[str, Any]] = {
        "opens": {"daily_usd": 1.0, "on_redis_down": "fail_open"},
        "closes": {"daily_usd": 1.0, "on_redis_down": "fail_closed"},
        "defaults": {"daily_usd": 1.0},
    }
    policies = {"default": {}, "fail_closed": {"on_redis_down": "fail_closed"}}
    seen: dict[tuple[str, str], dict[int, int]] = {}
    counted: dict[tuple[str, str], float] = {}
    with run_redis() as own:
        gateways = {
            name: gateway(
                world, procs, config(world, tenants, budgets, reservations=r, redis_url=own.url)
            )
            for name, r in policies.items()
        }
        for gw in gateways.values():  # Redis up: every tenant is served
            for tenant in tenants:
                out = await burst([gw], tenant, 1, "up")
                assert out.statuses() == {200: 1}, [error_of(e) for e in out.refusals]
        own.stop()
        for name, gw in gateways.items():
            for tenant in tenants:
                out = Outcome()
                sdk = client(gw, tenant)
                try:
                    for n in range(3):
                        await ask(sdk, f"down {n}", out)
                finally:
                    await sdk.close()
                seen[name, tenant] = out.statuses()
                counted[name, tenant] = await asyncio.to_thread(unchecked, gw, tenant)
                for exc in out.refusals:
                    error = error_of(exc)
                    kind = (exc.status_code, error.get("type"), error.get("code"))
                    assert kind == (503, "server_error", "service_unavailable"), (kind, error)
                    assert "Redis" in error["message"], error
                    assert "refuse" in error["message"], error
                    assert int(exc.response.headers["retry-after"]) >= 1
    print(f"\nRedis down: statuses {seen}; counted unchecked {counted}")
    assert seen == {
        ("default", "opens"): {200: 3},
        ("default", "closes"): {503: 3},
        ("default", "defaults"): {200: 3},  # fail_open by default
        ("default", "unbudgeted"): {200: 3},
        ("fail_closed", "opens"): {200: 3},  # the tenant's own policy wins
        ("fail_closed", "closes"): {503: 3},
        ("fail_closed", "defaults"): {503: 3},
        ("fail_closed", "unbudgeted"): {200: 3},  # nothing to check
    }
    assert counted == {
        ("default", "opens"): 3,
        ("default", "closes"): 0,
        ("default", "defaults"): 3,
        ("default", "unbudgeted"): 0,
        ("fail_closed", "opens"): 3,
        ("fail_closed", "closes"): 0,
        ("fail_closed", "defaults"): 0,
        ("fail_closed", "unbudgeted"): 0,
    }
