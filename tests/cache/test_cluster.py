"""The cache package on a local three-node Redis Cluster: the client, idempotency, single-flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.crc import key_slot

from cache.idempotency import Begun, IdempotencyStore, Mismatch, Replay, Running, fingerprint
from cache.redis_client import RedisClient
from cache.singleflight import Follower, Leader, SingleFlight
from tests.cache.test_idempotency import FP, attempt, response
from tests.cache.test_singleflight import CACHE_KEY, DIGEST, request
from tests.support.redis_server import RedisServer, run_redis


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisServer]:
    with run_redis(cluster=True) as server:
        yield server


@pytest.fixture
def cluster_url(cluster: RedisServer) -> str:
    for port in cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port) as node:
            node.flushall()
    return cluster.url


@pytest.fixture
async def clients(cluster_url: str) -> AsyncIterator[list[RedisClient]]:
    """Two gateways' cluster clients."""
    made = [RedisClient(cluster_url, cluster=True, call_budget_s=0.5) for _ in range(2)]
    for client in made:
        await client.start()
    yield made
    for client in made:
        await client.close()


def node_sizes(cluster: RedisServer) -> list[int]:
    sizes = []
    for port in cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port) as node:
            sizes.append(int(node.dbsize()))
    return sizes


async def test_the_client_spans_the_nodes_and_runs_scripts_within_a_tag(
    clients: list[RedisClient], cluster: RedisServer
) -> None:
    client = clients[0]
    assert await client.ping()

    async def write(redis: Redis) -> list[Any]:
        for i in range(30):
            await redis.set(f"k{i}", i)
        # A non-transactional pipeline may span slots: the client splits it per node.
        pipe = redis.pipeline(transaction=False)
        for i in range(30):
            pipe.get(f"k{i}")
        got: list[Any] = await pipe.execute()
        return got

    assert await client.call("test.write", write, None) == [str(i).encode() for i in range(30)]
    assert all(size > 0 for size in node_sizes(cluster))

    async def script(redis: Redis) -> Any:
        keys = ["{t}:a", "{t}:b"]
        return await redis.eval(
            "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])", 2, *keys, "x"
        )

    assert await client.call("test.script", script, None) == 1
    assert client.failures == 0

    # Keys of one script in different slots: a bug, and it fails open (counted, logged).
    async def cross_slot(redis: Redis) -> Any:
        return await redis.eval("return 1", 2, "{a}:x", "{b}:x")

    assert await client.call("test.cross_slot", cross_slot, "default") == "default"
    assert client.failures == 1
    assert client.available  # the cluster is up: no reason to skip it


async def test_a_burst_of_first_calls_on_a_fresh_client_all_succeed(cluster_url: str) -> None:
    client = RedisClient(cluster_url, cluster=True, call_budget_s=1.0)
    await client.start()
    try:

        async def set_nx(index: int) -> Any:
            async def run(redis: Redis) -> Any:
                return await redis.set(f"{{burst{index % 9}}}:k{index}", 1, nx=True)

            return await client.call("test.burst", run, None)

        assert await asyncio.gather(*(set_nx(i) for i in range(60))) == [True] * 60
        assert client.failures == 0
    finally:
        await client.close()


async def test_discovery_is_not_bound_by_the_call_budget(cluster_url: str) -> None:
    # Discovery takes longer than this budget (CLUSTER SLOTS and COMMAND);
    # the command itself does not.
    client = RedisClient(cluster_url, cluster=True, call_budget_s=0.015)
    await client.start()
    try:

        async def set_get(redis: Redis) -> Any:
            await redis.set("{d}:k", "v")
            return await redis.get("{d}:k")

        assert await client.call("test.first", set_get, None) == b"v"
        assert client.failures == 0
    finally:
        await client.close()


async def test_idempotency_on_a_cluster(clients: list[RedisClient]) -> None:
    stores = [IdempotencyStore(client) for client in clients]
    begun = await stores[0].begin("acme", "k", FP)
    assert isinstance(begun, Begun)
    assert isinstance(await stores[1].begin("acme", "k", FP), Running)
    assert isinstance(await stores[1].begin("acme", "k", fingerprint({"x": 1})), Mismatch)
    assert await stores[0].complete("acme", "k", begun.token, response(b'{"a": 1}'))
    assert await stores[1].begin("acme", "k", FP) == Replay(response(b'{"a": 1}'))

    # Many keys (records on every node), each contended by two gateways: one run per key.
    keys = [f"order-{i}" for i in range(6)]
    results = await asyncio.gather(
        *(attempt(store, "acme", key, 0.2) for key in keys for store in stores for _ in range(5))
    )
    for index in range(len(keys)):
        per_key = results[index * 10 : (index + 1) * 10]
        assert [kind for kind, _ in per_key].count("ran") == 1, per_key
        assert len({body for _, body in per_key}) == 1
    slots = {key_slot(stores[0].record_key("acme", key).encode()) for key in keys}
    assert len(slots) == len(keys)

    # A released key goes to exactly one waiter.
    owner = await stores[0].begin("acme", "flaky", FP)
    assert isinstance(owner, Begun)
    waiters = [asyncio.create_task(attempt(store, "acme", "flaky", 0.1)) for store in stores * 4]
    await asyncio.sleep(0.1)
    assert await stores[0].release("acme", "flaky", owner.token)
    kinds = [kind for kind, _ in await asyncio.gather(*waiters)]
    assert kinds.count("ran") == 1, kinds


async def test_single_flight_on_a_cluster(clients: list[RedisClient]) -> None:
    flights = [SingleFlight(client) for client in clients]
    # The lock and the cache entry it guards are in one slot.
    assert key_slot(flights[0].lock_key(DIGEST).encode()) == key_slot(CACHE_KEY.encode())

    results = await asyncio.gather(
        *(request(flight, client, 0.2) for flight, client in zip(flights, clients, strict=True)),
        *(request(flights[i % 2], clients[i % 2], 0.2) for i in range(18)),
    )
    kinds = [kind for kind, _ in results]
    assert kinds.count("led") == 1, kinds
    assert kinds.count("coalesced") == 19, kinds

    # A leader that stores nothing hands over to exactly one follower.
    async def clear(redis: Redis) -> None:
        await redis.delete(CACHE_KEY)

    await clients[0].call("test.clear", clear, None)
    leader = await flights[0].acquire(DIGEST)
    assert isinstance(leader, Leader)
    assert isinstance(await flights[1].acquire(DIGEST), Follower)
    followers = [
        asyncio.create_task(request(flights[i % 2], clients[i % 2], 0.1)) for i in range(8)
    ]
    await asyncio.sleep(0.05)
    assert await flights[0].release(DIGEST, leader.token)
    kinds = [kind for kind, _ in await asyncio.gather(*followers)]
    assert kinds.count("led") == 1, kinds
    assert kinds.count("coalesced") == 7, kinds


async def test_a_cluster_outage_fails_open_and_the_client_recovers(
    cluster: RedisServer, cluster_url: str
) -> None:
    failed: list[str] = []
    client = RedisClient(
        cluster_url, cluster=True, call_budget_s=0.2, backoff_s=0.2, on_failure=failed.append
    )
    await client.start()
    store = IdempotencyStore(client)

    async def set_get(redis: Redis) -> Any:
        await redis.set("{o}:k", "v")
        return await redis.get("{o}:k")

    try:
        assert await client.call("test.set_get", set_get, None) == b"v"
        cluster.stop()
        try:
            began = time.monotonic()
            for _ in range(20):
                assert await client.call("test.down", set_get, "default") == "default"
            assert type(await store.begin("acme", "k", FP)).__name__ == "Unprotected"
            # Twenty-one calls against a dead cluster cost about one budget, not twenty-one.
            assert time.monotonic() - began < 1.0
            assert not client.available
            assert len(failed) == 21
        finally:
            cluster.start()
        deadline = time.monotonic() + 10
        while await client.call("test.back", set_get, None) != b"v":
            assert time.monotonic() < deadline, "the cluster client did not recover by itself"
            await asyncio.sleep(0.1)
        assert isinstance(await store.begin("acme", "k", FP), Begun)
    finally:
        await client.close()
