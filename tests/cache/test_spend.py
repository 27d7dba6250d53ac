"""Holds and rate units in real Redis: taken by one admission call, let go in batches.

``cache.spend`` against the session's redis-server: scripts go by hash (their
text only when Redis lacks them), a settled request's hold and unused tokens
come back in the flush, many holds of one tenant in few calls, and a flush
that fails keeps them for the next.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import redis

from cache.redis_client import RedisClient
from cache.scripts import Script
from cache.spend import RELEASE_BATCH, RateCharge, SpendCounters, hold_keys, rate_key, window_keys
from metering.pricing import Cost
from metering.report import RequestReport
from metering.usage import TokenUsage

TENANT = "spend-test"


def settled(request_id: str, tokens: int, loaded_nanos: int = 10) -> RequestReport:
    return RequestReport(
        request_id, TENANT, "small", "m", "chat",
        usage=TokenUsage(prompt_tokens=tokens),
        cost=Cost(marginal_nanos=loaded_nanos // 2, loaded_nanos=loaded_nanos),
        finished_us=int(time.time() * 1_000_000),
    )  # fmt: skip


def stats(url: str, command: str) -> int:
    with redis.Redis.from_url(url) as client:
        info = client.info("commandstats")
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_script_goes_by_hash_and_its_text_only_when_redis_lacks_it(
    redis_client: RedisClient, redis_url: str
) -> None:
    script = Script("return {KEYS[1], ARGV[1]}")

    async def run(client: redis.asyncio.Redis) -> object:
        return await script(client, ["{t}:k"], ["v"])

    evals, shas = stats(redis_url, "eval"), stats(redis_url, "evalsha")
    assert await redis_client.call("test", run, None) == [b"{t}:k", b"v"]  # first: the text
    assert await redis_client.call("test", run, None) == [b"{t}:k", b"v"]  # then: the hash
    assert stats(redis_url, "eval") == evals + 1
    assert stats(redis_url, "evalsha") == shas + 2
    with redis.Redis.from_url(redis_url) as client:
        client.script_flush()
    assert await redis_client.call("test", run, None) == [b"{t}:k", b"v"]
    assert stats(redis_url, "eval") == evals + 2  # Redis lost it: the text once more


async def test_settled_holds_are_let_go_in_batches_and_unused_tokens_come_back(
    redis_client: RedisClient, redis_url: str
) -> None:
    counters = SpendCounters(redis_client)
    day, _ = window_keys(counters.prefix, TENANT, datetime.now(UTC))
    tokens_key = rate_key(counters.prefix, TENANT, "", "tokens")
    per_token_ms = 60_000 / 1_000_000  # a million tokens a minute
    holds = RELEASE_BATCH + 7  # two release calls
    for i in range(holds):
        charge = RateCharge(tokens_key, 100, per_token_ms)
        counters.holding(f"req-{i}", f"req-{i}.h", TENANT, [(tokens_key, per_token_ms, 100)])
        admitted = await counters.admit(TENANT, f"req-{i}.h", 1_000, [(day, 10**12)], [charge], 60)
        assert admitted is not None
        assert admitted.admitted
    client = redis.Redis.from_url(redis_url)
    holds_key, hold_key = hold_keys(counters.prefix, TENANT)
    assert client.zcard(holds_key) == holds
    assert int(client.hget(day, "held") or 0) == holds * 1_000
    arrival = float(client.get(tokens_key) or 0)

    counters.add_many([settled(f"req-{i}", tokens=40) for i in range(holds)])
    evals = stats(redis_url, "eval")
    assert await counters.flush()
    assert stats(redis_url, "eval") - evals == 2  # one call per RELEASE_BATCH holds
    assert client.zcard(holds_key) == 0
    assert client.hlen(hold_key) == 0
    assert int(client.hget(day, "held") or 0) == 0
    assert int(client.hget(day, "cost_loaded_nanos") or 0) == holds * 10
    # Each took 100 tokens and used 40: 60 each come back, once.
    given_back = arrival - float(client.get(tokens_key) or 0)
    assert abs(given_back - holds * 60 * per_token_ms) < 1e-6 * holds
    client.close()


async def test_a_flush_that_fails_keeps_spend_and_holds_for_the_next(
    redis_client: RedisClient, redis_url: str
) -> None:
    counters = SpendCounters(redis_client)
    day, _ = window_keys(counters.prefix, TENANT, datetime.now(UTC))
    for i in range(3):
        counters.holding(f"req-{i}", f"req-{i}.h", TENANT)
        admitted = await counters.admit(TENANT, f"req-{i}.h", 500, [(day, 10**9)], [], 60)
        assert admitted is not None
        assert admitted.admitted
    check = redis.Redis.from_url(redis_url)
    assert int(check.hget(day, "held") or 0) == 1_500
    counters.add_many([settled(f"req-{i}", tokens=1) for i in range(2)])
    # Redis refuses every write (it wants a replica it does not have): nothing applied.
    check.config_set("min-replicas-to-write", 1)
    try:
        assert not await counters.flush()
    finally:
        check.config_set("min-replicas-to-write", 0)
    assert int(check.hget(day, "held") or 0) == 1_500
    counters.add_many([settled("req-2", tokens=1)])
    assert await counters.flush()  # the kept ones and the new one
    assert int(check.hget(day, "held") or 0) == 0
    assert int(check.hget(day, "requests") or 0) == 3  # each counted once
    assert check.zcard(hold_keys(counters.prefix, TENANT)[0]) == 0
    check.close()
