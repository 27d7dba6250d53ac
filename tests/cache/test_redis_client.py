"""RedisClient fails open: errors and timeouts give the default, are counted, and pass."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from cache.redis_client import RedisClient
from tests.support.redis_server import run_redis

MakeClient = Callable[..., Awaitable[RedisClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[RedisClient] = []

    async def make(url: str, **kwargs: object) -> RedisClient:
        client = RedisClient(url, **kwargs)  # type: ignore[arg-type]
        await client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def _set_get(redis: Redis) -> Any:
    await redis.set("k", "v")
    return await redis.get("k")


async def _block(redis: Redis) -> Any:
    # Blocks this connection only, for a second: a slow Redis.
    return await redis.blpop(["never-pushed"], timeout=1)


async def test_call_returns_the_result(make_client: MakeClient, redis_url: str) -> None:
    client = await make_client(redis_url)
    assert await client.call("test.set_get", _set_get, None) == b"v"
    assert await client.ping()
    assert client.failures == 0


async def test_call_before_start_is_a_bug(redis_url: str) -> None:
    client = RedisClient(redis_url)
    with pytest.raises(RuntimeError):
        await client.call("test", _set_get, None)


async def test_command_error_gives_default_but_keeps_the_circuit_closed(
    make_client: MakeClient, redis_url: str
) -> None:
    failed: list[str] = []
    client = await make_client(redis_url, on_failure=failed.append)

    async def wrong_type(redis: Redis) -> Any:
        await redis.set("s", "string")
        return await redis.hincrby("s", "f", 1)

    assert await client.call("test.wrong_type", wrong_type, "default") == "default"
    assert failed == ["test.wrong_type"]
    assert client.available
    assert await client.call("test.set_get", _set_get, None) == b"v"


async def test_slow_redis_times_out_within_the_budget_then_is_skipped(
    make_client: MakeClient, redis_url: str
) -> None:
    failed: list[str] = []
    client = await make_client(
        redis_url, call_budget_s=0.05, backoff_s=0.3, on_failure=failed.append
    )
    began = time.monotonic()
    assert await client.call("test.slow", _block, "default") == "default"
    assert time.monotonic() - began < 0.5
    assert failed == ["test.slow"]
    assert not client.available

    # The circuit is open: skipped at once, still counted, Redis not touched.
    touched = False

    async def touch(redis: Redis) -> str:
        nonlocal touched
        touched = True
        return "value"

    began = time.monotonic()
    assert await client.call("test.skipped", touch, "default") == "default"
    assert time.monotonic() - began < 0.2  # no budget spent (loosely: CI is slow)
    assert not touched
    assert failed == ["test.slow", "test.skipped"]

    await asyncio.sleep(0.35)
    assert await client.call("test.after", touch, "default") == "value"
    assert client.available


async def test_one_probe_at_a_time_after_the_backoff(
    make_client: MakeClient, redis_url: str
) -> None:
    client = await make_client(redis_url, call_budget_s=0.05, backoff_s=0.1)
    await client.call("test.slow", _block, None)
    await asyncio.sleep(0.15)
    # The first call after the backoff probes (and is slow); the others skip meanwhile.
    results = await asyncio.gather(
        client.call("probe", _block, "default"),
        *(client.call("other", _set_get, b"skipped") for _ in range(5)),
    )
    assert results == ["default"] + [b"skipped"] * 5


async def test_outage_and_recovery_on_the_same_client(make_client: MakeClient) -> None:
    failed: list[str] = []
    with run_redis() as server:
        client = await make_client(
            server.url, call_budget_s=0.05, backoff_s=0.2, on_failure=failed.append
        )
        assert await client.call("test.set_get", _set_get, None) == b"v"

        server.stop()
        began = time.monotonic()
        for _ in range(20):
            assert await client.call("test.down", _set_get, b"default") == b"default"
        # Twenty calls against a dead server cost about one budget, not twenty.
        assert time.monotonic() - began < 0.5
        assert failed == ["test.down"] * 20
        assert client.failures == 20

        server.start()
        deadline = time.monotonic() + 5
        while await client.call("test.back", _set_get, None) != b"v":
            assert time.monotonic() < deadline, "the client did not reconnect by itself"
            await asyncio.sleep(0.05)
        assert client.available


async def test_failures_are_logged_at_most_once_per_interval(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    with run_redis() as server:
        client = await make_client(server.url, backoff_s=0.0, log_interval_s=60)
        server.stop()
        with caplog.at_level(logging.WARNING, logger="tollway.redis"):
            for _ in range(10):
                await client.call("test.down", _set_get, None)
    warnings = [r for r in caplog.records if r.name == "tollway.redis"]
    assert len(warnings) == 1
    assert "test.down" in warnings[0].getMessage()
    assert client.failures == 10
