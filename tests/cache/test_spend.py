"""Holds and rate units in real Redis: taken by one admission call, let go in batches.

``cache.spend`` against the session's redis-server: scripts go by hash (their
text only when Redis lacks them), a settled request's hold and unused tokens
come back in the flush, many holds of one tenant in few calls, and a flush
that fails keeps them for the next.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import redis

from cache.redis_client import RedisClient
from cache.scripts import Script
from cache.spend import (
    RELEASE,
    RELEASE_BATCH,
    RateCharge,
    SpendCounters,
    hold_keys,
    rate_key,
    window_keys,
)
from metering.pricing import Cost
from metering.report import RequestReport
from metering.usage import TokenUsage

TENANT = "spend-test"


def settled(hold_id: str, tokens: int, loaded_nanos: int = 10) -> RequestReport:
    """A settled request's report: it held ``hold_id`` and used ``tokens``."""
    return RequestReport(
        hold_id.split(".")[0], TENANT, "small", "m", "chat",
        usage=TokenUsage(prompt_tokens=tokens),
        cost=Cost(marginal_nanos=loaded_nanos // 2, loaded_nanos=loaded_nanos),
        finished_us=int(time.time() * 1_000_000),
        hold_id=hold_id,
    )  # fmt: skip


def stats(url: str, command: str) -> int:
    with redis.Redis.from_url(url) as client:
        info = client.info("commandstats")
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture
def quiet_redis(redis_url: str) -> str:
    """The session server with its script cache and command counts emptied."""
    with redis.Redis.from_url(redis_url) as client:
        client.script_flush()
        client.config_resetstat()
    return redis_url


async def test_a_script_goes_by_hash_and_its_text_only_when_redis_lacks_it(
    redis_client: RedisClient, quiet_redis: str
) -> None:
    script = Script("return {KEYS[1], ARGV[1]}")

    async def run(client: redis.asyncio.Redis) -> object:
        return await script(client, ["{t}:k"], ["v"])

    assert await redis_client.call("test", run, None) == [b"{t}:k", b"v"]  # first: the text
    assert await redis_client.call("test", run, None) == [b"{t}:k", b"v"]  # then: the hash
    assert stats(quiet_redis, "eval") == 1
    assert stats(quiet_redis, "evalsha") == 2
    with redis.Redis.from_url(quiet_redis) as client:
        client.script_flush()
    assert await redis_client.call("test", run, None) == [b"{t}:k", b"v"]
    assert stats(quiet_redis, "eval") == 2  # Redis lost it: the text once more


async def test_settled_holds_are_let_go_in_batches_and_unused_tokens_come_back(
    redis_client: RedisClient, quiet_redis: str
) -> None:
    counters = SpendCounters(redis_client)
    day, _ = window_keys(counters.prefix, TENANT, datetime.now(UTC))
    tenant_tokens = rate_key(counters.prefix, TENANT, "", "tokens")
    key_tokens = rate_key(counters.prefix, TENANT, "k1", "tokens")
    per_token_ms = 60_000 / 1_000_000  # a million tokens a minute
    holds = RELEASE_BATCH + 7  # two release calls
    for i in range(holds):
        # Every other request comes with key k1, whose own limit it is charged too.
        rates = [tenant_tokens] + ([key_tokens] if i % 2 else [])
        charges = [RateCharge(key, 100, per_token_ms) for key in rates]
        counters.holding(f"req-{i}.h", TENANT, [(key, per_token_ms, 100) for key in rates])
        admitted = await counters.admit(TENANT, f"req-{i}.h", 1_000, [(day, 10**12)], charges, 60)
        assert admitted is not None
        assert admitted.admitted
    client = redis.Redis.from_url(quiet_redis)
    holds_key, hold_key = hold_keys(counters.prefix, TENANT)
    assert client.zcard(holds_key) == holds
    assert int(client.hget(day, "held") or 0) == holds * 1_000
    arrivals = [float(client.get(key) or 0) for key in (tenant_tokens, key_tokens)]

    counters.add_many([settled(f"req-{i}.h", tokens=40) for i in range(holds)])
    assert await counters.flush()
    # ADMIT's text once (the script cache was emptied), then one RELEASE per batch.
    assert stats(quiet_redis, "eval") == 1 + 2
    assert stats(quiet_redis, "evalsha") == holds  # the first answered NOSCRIPT
    assert client.zcard(holds_key) == 0
    assert client.hlen(hold_key) == 0
    assert int(client.hget(day, "held") or 0) == 0
    assert int(client.hget(day, "cost_loaded_nanos") or 0) == holds * 10
    # Each took 100 tokens and used 40: 60 come back to each limit it took them from.
    for key, arrival, charged in zip(
        (tenant_tokens, key_tokens), arrivals, (holds, holds // 2), strict=True
    ):
        given_back = arrival - float(client.get(key) or 0)
        assert abs(given_back - charged * 60 * per_token_ms) < 0.5  # ms, as Lua prints them
    client.close()


async def test_a_hold_gives_its_tokens_back_once_and_only_if_it_was_taken(
    redis_client: RedisClient, quiet_redis: str
) -> None:
    counters = SpendCounters(redis_client)
    tokens = rate_key(counters.prefix, TENANT, "", "tokens")
    charge = RateCharge(tokens, 1_000, 6.0)  # 10,000 tokens a minute: 6 ms a token
    admitted = await counters.admit(TENANT, "req-1.h", 0, [], [charge], 60)
    assert admitted is not None
    assert admitted.admitted  # rate units only: the hold is recorded all the same
    client = redis.Redis.from_url(quiet_redis)
    arrival = float(client.get(tokens) or 0)
    keys = [*hold_keys(counters.prefix, TENANT), tokens]
    # 500 tokens unused: 3,000 ms back; the same release again (a flush whose reply was
    # lost, sent again) and one for a hold Redis never took give nothing.
    for hold_id in ("req-1.h", "req-1.h", "req-never.h"):
        client.eval(RELEASE, len(keys), *keys, 1, hold_id, 1, 3, 3_000)
        assert float(client.get(tokens) or 0) == pytest.approx(arrival - 3_000)
    client.close()


async def test_a_flush_that_fails_keeps_spend_and_holds_for_the_next(
    redis_client: RedisClient, redis_url: str
) -> None:
    counters = SpendCounters(redis_client)
    day, _ = window_keys(counters.prefix, TENANT, datetime.now(UTC))
    for i in range(3):
        counters.holding(f"req-{i}.h", TENANT)
        admitted = await counters.admit(TENANT, f"req-{i}.h", 500, [(day, 10**9)], [], 60)
        assert admitted is not None
        assert admitted.admitted
    check = redis.Redis.from_url(redis_url)
    assert int(check.hget(day, "held") or 0) == 1_500
    counters.add_many([settled(f"req-{i}.h", tokens=1) for i in range(2)])
    # Redis refuses every write (it wants a replica it does not have): nothing applied.
    check.config_set("min-replicas-to-write", 1)
    try:
        assert not await counters.flush()
    finally:
        check.config_set("min-replicas-to-write", 0)
    assert int(check.hget(day, "held") or 0) == 1_500
    counters.add_many([settled("req-2.h", tokens=1)])
    assert await counters.flush()  # the kept ones and the new one
    assert int(check.hget(day, "held") or 0) == 0
    assert int(check.hget(day, "requests") or 0) == 3  # each counted once
    assert check.zcard(hold_keys(counters.prefix, TENANT)[0]) == 0
    check.close()
