"""Fixtures for the Redis-backed cache package: one real redis-server for the session.

``redis_url`` empties it before each test. Tests that kill Redis (outages,
recovery) start their own server with ``run_redis()`` so the shared one
stays up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from cache.redis_client import RedisClient
from tests.support.redis_server import RedisServer, run_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with run_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, FLUSHALLed first."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[RedisClient]:
    client = RedisClient(redis_url, call_budget_s=0.5)
    await client.start()
    try:
        yield client
    finally:
        await client.close()
