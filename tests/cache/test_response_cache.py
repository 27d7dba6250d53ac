"""The response cache against a real redis-server: store, find, expire, refuse, fail open."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis
from redis.crc import key_slot

from cache.cache_key import cache_digest
from cache.redis_client import RedisClient
from cache.response_cache import ENTRY_FORMAT, CachedResponse, ResponseCache, storable
from tests.support.redis_server import run_redis

BODY = {"model": "auto", "messages": [{"role": "user", "content": "Name a prime."}], "seed": 1}
DIGEST = cache_digest("acme", "llama-8b", "chat.completions", BODY)
NOW = 1_760_000_000.0


def completion(content: str = "Seven.", *finish: str | None) -> dict[str, Any]:
    reasons = finish or ("stop",)
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_760_000_000,
        "model": "llama-8b",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, reason in enumerate(reasons)
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }


def entry(content: str = "Seven.", stored_at: float = NOW) -> CachedResponse:
    return CachedResponse(
        completion=completion(content),
        stored_at=stored_at,
        endpoint="chat.completions",
        cost_usd=Decimal("0.000012345"),
        cost_loaded_usd=Decimal("0.000031000"),
        prompt_tokens=9,
        completion_tokens=3,
    )


MakeCache = Callable[..., Awaitable[ResponseCache]]


@pytest.fixture
async def make_cache() -> AsyncIterator[MakeCache]:
    clients: list[RedisClient] = []

    async def make(
        url: str, *, client: dict[str, Any] | None = None, **kwargs: Any
    ) -> ResponseCache:
        redis_client = RedisClient(url, **(client or {"call_budget_s": 0.5}))
        await redis_client.start()
        clients.append(redis_client)
        return ResponseCache(redis_client, **kwargs)

    yield make
    for redis_client in clients:
        await redis_client.close()


@pytest.fixture
async def cache(make_cache: MakeCache, redis_url: str) -> ResponseCache:
    return await make_cache(redis_url)


def test_keys_are_hash_tagged_by_the_digest() -> None:
    cache = ResponseCache(RedisClient("redis://127.0.0.1:1/0"))
    assert cache.key(DIGEST) == f"tollway:cache:{{{DIGEST}}}"
    assert ResponseCache(cache.redis, prefix="t2").key(DIGEST) == f"t2:cache:{{{DIGEST}}}"
    # The in-flight lock another module keeps beside the entry is in the same slot.
    assert key_slot(cache.key(DIGEST).encode()) == key_slot(f"tollway:flight:{{{DIGEST}}}".encode())
    for bad in ("", "abc", DIGEST.upper(), DIGEST[:-1] + "}", DIGEST + "0"):
        with pytest.raises(ValueError, match="digest"):
            cache.key(bad)


async def test_put_then_get_gives_the_same_entry(cache: ResponseCache) -> None:
    stored = entry()
    assert await cache.put(DIGEST, stored, ttl_s=None)
    found = await cache.get(DIGEST, max_age_s=None, now=NOW + 3)
    assert found == stored
    assert found is not None
    assert found.cost_usd == Decimal("0.000012345")
    assert found.age_s(NOW + 3.9) == 3
    assert found.age_s(NOW - 5) == 0  # a clock behind the writer's never shows a negative Age


async def test_a_missing_entry_is_a_miss(cache: ResponseCache) -> None:
    assert await cache.get(DIGEST, max_age_s=None, now=NOW) is None


async def test_max_age_accepts_only_entries_young_enough(cache: ResponseCache) -> None:
    await cache.put(DIGEST, entry(stored_at=NOW - 10.5), ttl_s=None)
    assert await cache.get(DIGEST, max_age_s=None, now=NOW) is not None
    assert await cache.get(DIGEST, max_age_s=10, now=NOW) is not None  # Age: 10
    assert await cache.get(DIGEST, max_age_s=9, now=NOW) is None
    assert await cache.get(DIGEST, max_age_s=0, now=NOW) is None


async def test_the_ttl_is_set_and_the_entry_expires(cache: ResponseCache, redis_url: str) -> None:
    assert await cache.put(DIGEST, entry(), ttl_s=None)
    other = cache_digest("acme", "llama-8b", "chat.completions", {**BODY, "seed": 2})
    assert await cache.put(other, entry(), ttl_s=1)
    with redis.Redis.from_url(redis_url) as client:
        assert 3590 < client.ttl(cache.key(DIGEST)) <= 3600
        assert 0 < client.pttl(cache.key(other)) <= 1000
    deadline = time.monotonic() + 3
    while await cache.get(other, max_age_s=None, now=NOW) is not None:
        assert time.monotonic() < deadline, "the 1 s entry did not expire"
        await asyncio.sleep(0.05)
    assert await cache.get(DIGEST, max_age_s=None, now=NOW) is not None


async def test_a_ttl_below_one_second_is_a_bug(cache: ResponseCache) -> None:
    with pytest.raises(ValueError, match="TTL"):
        await cache.put(DIGEST, entry(), ttl_s=0)


async def test_entries_are_stored_compressed(cache: ResponseCache, redis_url: str) -> None:
    long = entry("A long, repetitive answer about primes and their gaps. " * 200)
    assert await cache.put(DIGEST, long, ttl_s=None)
    with redis.Redis.from_url(redis_url) as client:
        stored = client.get(cache.key(DIGEST))
    assert isinstance(stored, bytes)
    assert stored.startswith(ENTRY_FORMAT)
    as_json = orjson.dumps(long.completion)
    assert len(stored) < len(as_json) / 4
    assert orjson.loads(zlib.decompress(stored[1:]))["completion"] == long.completion


async def test_an_oversized_entry_is_refused(make_cache: MakeCache, redis_url: str) -> None:
    cache = await make_cache(redis_url, max_entry_bytes=500)
    assert await cache.put(DIGEST, entry("short"), ttl_s=None)
    # Random-looking text does not compress below the limit.
    noisy = entry("".join(f"{(i * 7919) % 10007:05d}" for i in range(300)))
    other = cache_digest("acme", "llama-8b", "chat.completions", {**BODY, "seed": 3})
    assert not await cache.put(other, noisy, ttl_s=None)
    with redis.Redis.from_url(redis_url) as client:
        assert not client.exists(cache.key(other))


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        (("stop",), True),
        (("length",), True),
        (("tool_calls",), True),
        (("stop", "length"), True),
        (("stop", "abort"), False),
        (("abort",), False),
        (("error",), False),
        ((None,), False),
        (("stop", None), False),
        (("content_filter",), False),
    ],
)
def test_storable_only_when_every_choice_finished(
    finish: tuple[str | None, ...], expected: bool
) -> None:
    assert storable(completion("x", *finish)) is expected
    assert ResponseCache.storable(completion("x", *finish)) is expected


@pytest.mark.parametrize(
    "bad",
    [{}, {"choices": []}, {"choices": None}, {"choices": ["stop"]}, {"error": {"message": "x"}}],
)
def test_not_storable_without_finished_choices(bad: dict[str, Any]) -> None:
    assert not storable(bad)


async def test_an_incomplete_answer_is_not_stored(cache: ResponseCache) -> None:
    aborted = CachedResponse(
        completion("partial", "abort"), NOW, "chat.completions", Decimal(0), Decimal(0), 9, 1
    )
    assert not await cache.put(DIGEST, aborted, ttl_s=None)
    assert await cache.get(DIGEST, max_age_s=None, now=NOW) is None


async def test_tenants_never_see_each_others_entries(cache: ResponseCache) -> None:
    acme = cache_digest("acme", "llama-8b", "chat.completions", BODY)
    globex = cache_digest("globex", "llama-8b", "chat.completions", BODY)
    assert await cache.put(acme, entry("acme's answer"), ttl_s=None)
    assert await cache.get(globex, max_age_s=None, now=NOW) is None
    # globex storing its own answer to the same request leaves acme's intact.
    assert await cache.put(globex, entry("globex's answer"), ttl_s=None)
    found = await cache.get(acme, max_age_s=None, now=NOW)
    assert found is not None
    assert found.completion["choices"][0]["message"]["content"] == "acme's answer"


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"plain",
        ENTRY_FORMAT + b"not zlib",
        ENTRY_FORMAT + zlib.compress(b"[1, 2]"),
        ENTRY_FORMAT + zlib.compress(b'{"completion": 5}'),
    ],
)
async def test_an_unreadable_entry_is_a_miss(
    cache: ResponseCache, redis_url: str, garbage: bytes
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set(cache.key(DIGEST), garbage)
    assert await cache.get(DIGEST, max_age_s=None, now=NOW) is None


async def test_redis_down_means_a_miss_and_no_store_within_the_budget(
    make_cache: MakeCache,
) -> None:
    failed: list[str] = []
    with run_redis() as server:
        cache = await make_cache(
            server.url, client={"call_budget_s": 0.05, "on_failure": failed.append}
        )
        assert await cache.put(DIGEST, entry(), ttl_s=None)
        server.stop()
        began = time.perf_counter()
        assert await cache.get(DIGEST, max_age_s=None, now=NOW) is None
        assert not await cache.put(DIGEST, entry(), ttl_s=None)
        elapsed = time.perf_counter() - began
    assert elapsed < 0.5
    assert failed == ["cache.get", "cache.put"]


async def test_a_slow_redis_means_a_miss_within_the_budget(make_cache: MakeCache) -> None:
    with run_redis() as server:
        cache = await make_cache(server.url, client={"call_budget_s": 0.05})
        assert await cache.put(DIGEST, entry(), ttl_s=None)
        with redis.Redis.from_url(server.url) as admin:
            admin.execute_command("CLIENT", "PAUSE", 300, "ALL")  # every client stalls
        began = time.perf_counter()
        assert await cache.get(DIGEST, max_age_s=None, now=NOW) is None
        elapsed = time.perf_counter() - began
    assert elapsed < 0.2
    assert cache.redis.failures == 1


async def test_put_and_get_on_a_redis_cluster(make_cache: MakeCache) -> None:
    with run_redis(cluster=True) as server:
        cache = await make_cache(server.url, client={"call_budget_s": 2.0, "cluster": True})
        digests = [
            cache_digest(tenant, "llama-8b", "chat.completions", BODY)
            for tenant in ("acme", "globex", "initech", "umbrella", "hooli", "stark")
        ]
        with redis.RedisCluster.from_url(server.url) as admin:
            nodes = {admin.get_node_from_key(cache.key(d)).port for d in digests}
        assert len(nodes) > 1  # the entries spread over the nodes
        for n, digest in enumerate(digests):
            assert await cache.put(digest, entry(f"answer {n}"), ttl_s=60)
        for n, digest in enumerate(digests):
            found = await cache.get(digest, max_age_s=None, now=NOW)
            assert found is not None
            assert found.completion["choices"][0]["message"]["content"] == f"answer {n}"
        assert cache.redis.failures == 0
