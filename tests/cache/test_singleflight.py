"""SingleFlight against a real Redis: one leader, followers get its result, no one hangs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis
from redis.asyncio import Redis

from cache.redis_client import RedisClient
from cache.singleflight import Follower, Leader, SingleFlight, Unprotected
from tests.support.redis_server import run_redis

DIGEST = "ab" * 32
CACHE_KEY = f"tollway:cache:{{{DIGEST}}}"


@pytest.fixture
def flight(redis_client: RedisClient) -> SingleFlight:
    return SingleFlight(redis_client)


@pytest.fixture
async def second_client(redis_url: str) -> AsyncIterator[RedisClient]:
    """Another gateway's connection to the same Redis."""
    client = RedisClient(redis_url, call_budget_s=0.5)
    await client.start()
    yield client
    await client.close()


def cache_lookup(client: RedisClient) -> Callable[[], Awaitable[bytes | None]]:
    """The response-cache lookup a follower is given: the entry under the digest, if any."""

    async def lookup() -> bytes | None:
        async def get(redis: Redis) -> bytes | None:
            found = await redis.get(CACHE_KEY)
            assert found is None or isinstance(found, bytes)
            return found

        return await client.call("test.cache_get", get, None)

    return lookup


async def store_result(client: RedisClient, value: bytes) -> None:
    async def put(redis: Redis) -> None:
        await redis.set(CACHE_KEY, value)

    await client.call("test.cache_put", put, None)


async def request(
    flight: SingleFlight, client: RedisClient, work_s: float, store: bool = True
) -> tuple[str, bytes | None]:
    """One cacheable request as the gateway runs it: lead (go upstream, store) or follow."""
    role = await flight.acquire(DIGEST)
    outcome: bytes | Leader | Follower | Unprotected | None = role
    if isinstance(role, Follower):
        outcome = await flight.wait(DIGEST, timeout_s=5, result=cache_lookup(client))
        if isinstance(outcome, bytes):
            return "coalesced", outcome
    if isinstance(outcome, Leader):
        try:
            async with flight.renewer(DIGEST, outcome.token):
                await asyncio.sleep(work_s)
                if store:
                    await store_result(client, b"answer")
        finally:
            await flight.release(DIGEST, outcome.token)
        return "led", None
    return type(outcome).__name__, None


async def test_fifty_identical_requests_on_two_gateways_go_upstream_once(
    flight: SingleFlight, redis_client: RedisClient, second_client: RedisClient
) -> None:
    other = SingleFlight(second_client)
    results = await asyncio.gather(
        *(request(flight, redis_client, 0.2) for _ in range(25)),
        *(request(other, second_client, 0.2) for _ in range(25)),
    )
    kinds = [kind for kind, _ in results]
    assert kinds.count("led") == 1, kinds
    assert kinds.count("coalesced") == 49, kinds
    assert {value for kind, value in results if kind == "coalesced"} == {b"answer"}


async def test_a_leader_that_stores_nothing_hands_over_to_exactly_one_follower(
    flight: SingleFlight, redis_client: RedisClient
) -> None:
    leader = await flight.acquire(DIGEST)
    assert isinstance(leader, Leader)
    followers = [asyncio.create_task(request(flight, redis_client, 0.1)) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert await flight.release(DIGEST, leader.token)  # upstream failed: nothing stored
    kinds = [kind for kind, _ in await asyncio.gather(*followers)]
    assert kinds.count("led") == 1, kinds
    assert kinds.count("coalesced") == 9, kinds


async def test_a_dead_leader_s_lock_expires_and_a_follower_takes_over(
    redis_client: RedisClient,
) -> None:
    flight = SingleFlight(redis_client, lease_s=0.3)
    assert isinstance(await flight.acquire(DIGEST), Leader)  # and then it dies
    assert isinstance(await flight.acquire(DIGEST), Follower)
    began = time.monotonic()
    outcome = await flight.wait(DIGEST, timeout_s=3, result=cache_lookup(redis_client))
    assert isinstance(outcome, Leader)
    assert 0.2 < time.monotonic() - began < 1.0


async def test_a_follower_past_its_timeout_goes_upstream_itself(
    flight: SingleFlight, redis_client: RedisClient
) -> None:
    assert isinstance(await flight.acquire(DIGEST), Leader)
    began = time.monotonic()
    outcome = await flight.wait(DIGEST, timeout_s=0.2, result=cache_lookup(redis_client))
    assert outcome is None
    assert 0.2 <= time.monotonic() - began < 0.5


async def test_renewal_keeps_a_slow_leader_s_lock(redis_client: RedisClient) -> None:
    flight = SingleFlight(redis_client, lease_s=0.3)
    leader = await flight.acquire(DIGEST)
    assert isinstance(leader, Leader)
    async with flight.renewer(DIGEST, leader.token):
        outcome = await flight.wait(DIGEST, timeout_s=0.9, result=cache_lookup(redis_client))
        assert outcome is None  # three leases long, and never taken over
    assert await flight.release(DIGEST, leader.token)


async def test_release_is_compare_and_delete(
    flight: SingleFlight, redis_client: RedisClient, redis_url: str
) -> None:
    leader = await flight.acquire(DIGEST)
    assert isinstance(leader, Leader)
    assert not await flight.release(DIGEST, "someone-else")
    assert isinstance(await flight.acquire(DIGEST), Follower)
    assert await flight.release(DIGEST, leader.token)
    assert not await flight.release(DIGEST, leader.token)
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.keys() == []
    # The lock and the cache entry it guards share one hash tag (one cluster slot).
    assert flight.lock_key(DIGEST) == f"tollway:flight:{{{DIGEST}}}"


async def test_redis_down_means_unprotected_and_no_wait() -> None:
    with run_redis() as server:
        server.stop()
        client = RedisClient(server.url, call_budget_s=0.05, backoff_s=5.0)
        await client.start()
        try:
            flight = SingleFlight(client, lease_s=0.03)
            began = time.monotonic()
            assert isinstance(await flight.acquire(DIGEST), Unprotected)
            assert await flight.wait(DIGEST, timeout_s=5, result=cache_lookup(client)) is None
            assert not await flight.release(DIGEST, "token")
            async with flight.renewer(DIGEST, "token"):
                await asyncio.sleep(0.05)
            assert time.monotonic() - began < 0.5
        finally:
            await client.close()
