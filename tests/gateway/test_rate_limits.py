"""Rate limits shared by every gateway: requests and tokens per minute, per tenant and key.

Two gateway processes on one Redis, the simulator upstream, the openai SDK as
the client. A GCRA limit lets a full minute's worth through at once, then
refills evenly: a burst fired within ``elapsed`` seconds may get
``limit * (1 + elapsed / 60)`` through, never more (the documented tolerance).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from redis import Redis

from tests.conftest import FAST_SIM, KEY, OTHER_KEY, gateway_config
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.redis_server import RedisServer, run_redis


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with run_redis() as server:
        yield server


@pytest.fixture(scope="module")
def sims(log_dir: Path) -> Iterator[list[Proc]]:
    started = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
    yield started
    for sim in started:
        sim.stop()


def gateways(
    log_dir: Path, sims: list[Proc], redis: RedisServer, procs: list[Proc], **limits: Any
) -> list[Proc]:
    """Two gateways with tenant acme's ``limits``, on a Redis emptied first."""
    with Redis.from_url(redis.url) as client:
        client.flushall()
    config = gateway_config([sims[0].url], [sims[1].url], redis.url)
    config["rate_limits"] = {"acme": limits}
    started = [start_gateway(log_dir, config) for _ in range(2)]
    procs.extend(started)
    return started


async def burst(
    gateways: list[Proc], count: int, key: str = KEY, max_tokens: int = 4
) -> tuple[list[Any], float]:
    """``count`` requests at once, alternating gateways: the answers (or errors), and how
    long the burst took to be admitted."""
    clients = [
        openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0) for g in gateways
    ]

    async def one(i: int) -> Any:
        try:
            return await clients[i % len(clients)].chat.completions.with_raw_response.create(
                model="sim-small",
                messages=[{"role": "user", "content": f"burst {i}"}],
                max_tokens=max_tokens,
            )
        except openai.APIStatusError as exc:
            return exc

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.monotonic() - started
    for client in clients:
        await client.close()
    return list(results), elapsed


def split(results: list[Any]) -> tuple[list[Any], list[openai.APIStatusError]]:
    ok = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    return ok, refused


async def test_requests_per_minute_hold_across_two_gateways(
    log_dir: Path, sims: list[Proc], redis_server: RedisServer, procs: list[Proc]
) -> None:
    pair = gateways(log_dir, sims, redis_server, procs, requests_per_minute=60)
    results, elapsed = await burst(pair, 200)
    ok, refused = split(results)
    allowed = 60 * (1 + elapsed / 60)
    print(f"60/min, 200 fired over two gateways in {elapsed:.2f} s: {len(ok)} accepted")
    assert 60 <= len(ok) <= math.floor(allowed) + 1
    assert len(ok) + len(refused) == 200
    for error in refused:
        assert error.status_code == 429
        assert error.code == "rate_limit_exceeded"
        assert "60 requests per minute" in error.message
        assert int(error.response.headers["retry-after"]) >= 1
        assert error.response.headers["x-ratelimit-limit-requests"] == "60"
    for answer in ok:
        assert answer.headers["x-ratelimit-limit-requests"] == "60"
        assert 0 <= int(answer.headers["x-ratelimit-remaining-requests"]) < 60
        assert answer.headers["x-ratelimit-reset-requests"].endswith("s")
    # Another tenant has no limit and no headers.
    other = openai.OpenAI(base_url=pair[0].url + "/v1", api_key=OTHER_KEY, max_retries=0)
    free = other.chat.completions.with_raw_response.create(
        model="sim-small", messages=[{"role": "user", "content": "free"}], max_tokens=4
    )
    assert "x-ratelimit-limit-requests" not in free.headers
    other.close()


async def test_tokens_per_minute_reserve_max_tokens_and_give_back_what_was_not_used(
    log_dir: Path, sims: list[Proc], redis_server: RedisServer, procs: list[Proc]
) -> None:
    # Each request reserves its prompt estimate plus max_tokens=100; the simulator
    # answers 8-24 tokens, so a settled request gives most of it back.
    pair = gateways(log_dir, sims, redis_server, procs, tokens_per_minute=1000)
    results, elapsed = await burst(pair, 40, max_tokens=100)
    ok, refused = split(results)
    reserved_each = 100 + 20  # max_tokens plus (at least) the body's bytes / 4
    print(f"1000 tokens/min, 40 x {reserved_each} reserved at once: {len(ok)} accepted")
    assert 1 <= len(ok) <= math.ceil(1000 * (1 + elapsed / 60) / 100)
    assert refused
    for error in refused:
        assert error.code == "rate_limit_exceeded"
        assert "1000 tokens per minute" in error.message
    used = sum(r.parse().usage.total_tokens for r in ok)
    assert used < len(ok) * reserved_each
    # What they did not use comes back: the next request fits again at once.
    await asyncio.sleep(0.5)  # the settled requests' flush (ledger.sync_interval_s)
    again, _ = await burst(pair[:1], 1, max_tokens=100)
    ok_again, _ = split(again)
    assert len(ok_again) == 1, again
    remaining = int(ok_again[0].headers["x-ratelimit-remaining-tokens"])
    assert remaining < 1000


async def test_a_request_larger_than_a_minute_of_tokens_is_refused_without_retry_after(
    log_dir: Path, sims: list[Proc], redis_server: RedisServer, procs: list[Proc]
) -> None:
    pair = gateways(log_dir, sims, redis_server, procs, tokens_per_minute=1000)
    client = openai.OpenAI(base_url=pair[0].url + "/v1", api_key=KEY, max_retries=0)
    ask = {"model": "sim-small", "messages": [{"role": "user", "content": "n of them"}]}
    # 300 tokens a choice fits a minute of 1,000 once; four choices never can.
    fits = client.chat.completions.with_raw_response.create(**ask, max_tokens=300, n=1)
    assert fits.parse().choices
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**ask, max_tokens=300, n=4)
    assert refused.value.code == "rate_limit_exceeded"
    assert "Request too large" in refused.value.message
    assert "the limit is 1000 per minute" in refused.value.message
    assert "retry-after" not in refused.value.response.headers
    # Refused before Redis: it took nothing, so a request that fits is still admitted.
    again = client.chat.completions.with_raw_response.create(**ask, max_tokens=300, n=1)
    assert int(again.headers["x-ratelimit-remaining-tokens"]) < 1000
    client.close()
