"""IdempotencyStore against a real Redis: one run per key, replays, waits, leases, isolation.

Two "gateways" are two processes: the cross-process tests run this file as a
script (``python test_idempotency.py ...``, see ``_main``) beside the test's
own event loop, both talking to the same redis-server.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from cache.idempotency import (
    Begun,
    Conflict,
    IdempotencyStore,
    Mismatch,
    Outcome,
    Replay,
    Running,
    StoredResponse,
    Unprotected,
    fingerprint,
)
from cache.redis_client import RedisClient
from tests.support.redis_server import run_redis

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "stream": False}
FP = fingerprint(BODY)


@pytest.fixture
def store(redis_client: RedisClient) -> IdempotencyStore:
    return IdempotencyStore(redis_client)


def response(body: bytes) -> StoredResponse:
    return StoredResponse(200, {"content-type": "application/json"}, body)


async def attempt(
    store: IdempotencyStore, tenant: str, key: str, work_s: float, timeout_s: float = 10.0
) -> tuple[str, bytes]:
    """One request with an idempotency key, as the gateway would run it."""
    outcome: Outcome | Conflict = await store.begin(tenant, key, FP)
    if isinstance(outcome, Running):
        outcome = await store.wait(tenant, key, FP, timeout_s=timeout_s)
    if isinstance(outcome, Begun):
        async with store.renewer(tenant, key, outcome.token):
            await asyncio.sleep(work_s)
            body = f'{{"id": "{uuid.uuid4()}"}}'.encode()
        assert await store.complete(tenant, key, outcome.token, response(body))
        return "ran", body
    if isinstance(outcome, Replay):
        return "replayed", outcome.response.body or b""
    return type(outcome).__name__, b""


# -- a second gateway process --------------------------------------------------


async def _main(argv: list[str]) -> None:
    mode, url, tenant, key = argv[:4]
    client = RedisClient(url, call_budget_s=1.0)
    await client.start()
    try:
        if mode == "contend":
            store = IdempotencyStore(client)
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # "go"
            results = await asyncio.gather(
                *(attempt(store, tenant, key, 0.3) for _ in range(int(argv[4])))
            )
            print(orjson.dumps([[kind, body.decode()] for kind, body in results]).decode())
        elif mode == "own":
            store = IdempotencyStore(client, lease_s=float(argv[4]))
            outcome = await store.begin(tenant, key, FP)
            print(type(outcome).__name__, flush=True)
            await asyncio.sleep(3600)  # "working" until killed: no complete, no renewal
    finally:
        await client.close()


async def spawn(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


async def read_line(proc: asyncio.subprocess.Process, timeout_s: float = 10.0) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    return line.decode().strip()


# -- tests -------------------------------------------------------------------


def test_fingerprint_is_canonical() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    b = {"a": {"x": "é", "y": [1, 2]}, "b": 1}
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64
    assert fingerprint(a) != fingerprint({**a, "b": 2})
    assert fingerprint(a) != fingerprint({"b": 1, "a": {"y": [2, 1], "x": "é"}})


def test_stored_response_round_trip_and_compression() -> None:
    events = [b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'] * 200 + [
        b"data: [DONE]\n\n"
    ]
    stream = StoredResponse(200, {"content-type": "text/event-stream", "x-a": "\n"}, None, events)
    packed = stream.pack()
    assert StoredResponse.unpack(packed) == stream
    assert len(packed) < sum(map(len, events)) / 10
    for stored in (
        response(b'{"id": "x"}'),
        StoredResponse(400, {}, b""),
        StoredResponse(200, {}, None, []),
        StoredResponse(200, {}, b"body", [b"", b"e"]),
    ):
        assert StoredResponse.unpack(stored.pack()) == stored


async def test_begin_complete_replay(store: IdempotencyStore, redis_url: str) -> None:
    first = await store.begin("acme", "k1", FP)
    assert isinstance(first, Begun)
    assert isinstance(await store.begin("acme", "k1", FP), Running)

    stored = StoredResponse(201, {"content-type": "application/json"}, b'{"ok": true}')
    assert not await store.complete("acme", "k1", "not-the-token", stored)
    assert await store.complete("acme", "k1", first.token, stored)
    assert not await store.complete("acme", "k1", first.token, stored)  # once only

    for _ in range(2):
        assert await store.begin("acme", "k1", FP) == Replay(stored)
    # A done record cannot be released (nor renewed) by its former owner.
    assert not await store.release("acme", "k1", first.token)
    assert await store.begin("acme", "k1", FP) == Replay(stored)

    with redis.Redis.from_url(redis_url) as raw:
        ttl = raw.ttl(store.record_key("acme", "k1"))
    assert 86_000 < ttl <= 86_400


async def test_stream_is_replayed_as_its_events(store: IdempotencyStore) -> None:
    begun = await store.begin("acme", "stream", FP)
    assert isinstance(begun, Begun)
    events = [b'data: {"n": %d}\n\n' % i for i in range(50)] + [b"data: [DONE]\n\n"]
    stored = StoredResponse(200, {"content-type": "text/event-stream"}, None, events)
    assert await store.complete("acme", "stream", begun.token, stored)
    replay = await store.begin("acme", "stream", FP)
    assert isinstance(replay, Replay)
    assert replay.response.events == events
    assert replay.response.body is None


async def test_same_key_different_body_is_a_mismatch(store: IdempotencyStore) -> None:
    other = fingerprint({**BODY, "temperature": 0.5})
    begun = await store.begin("acme", "k", FP)
    assert isinstance(begun, Begun)
    assert isinstance(await store.begin("acme", "k", other), Mismatch)  # while running
    assert isinstance(await store.wait("acme", "k", other, timeout_s=0.2), Mismatch)
    assert await store.complete("acme", "k", begun.token, response(b"{}"))
    assert isinstance(await store.begin("acme", "k", other), Mismatch)  # once done
    assert isinstance(await store.begin("acme", "k", FP), Replay)


async def test_fifty_requests_from_two_processes_run_once(redis_url: str) -> None:
    proc = await spawn("contend", redis_url, "acme", "order-50", "25")
    try:
        assert await read_line(proc) == "ready"
        client = RedisClient(redis_url, call_budget_s=1.0)
        await client.start()
        try:
            store = IdempotencyStore(client)
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            here = await asyncio.gather(
                *(attempt(store, "acme", "order-50", 0.3) for _ in range(25))
            )
        finally:
            await client.close()
        there = [(kind, body.encode()) for kind, body in orjson.loads(await read_line(proc))]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    results = here + there
    assert len(results) == 50
    kinds = [kind for kind, _ in results]
    assert kinds.count("ran") == 1, kinds
    assert kinds.count("replayed") == 49, kinds
    assert len({body for _, body in results}) == 1  # all 50 got the same bytes


async def test_a_wait_past_its_bound_is_a_conflict(store: IdempotencyStore) -> None:
    assert isinstance(await store.begin("acme", "slow", FP), Begun)
    assert isinstance(await store.begin("acme", "slow", FP), Running)
    began = time.monotonic()
    outcome = await store.wait("acme", "slow", FP, timeout_s=0.2)
    elapsed = time.monotonic() - began
    assert outcome == Conflict(retry_after_s=1)
    assert 0.2 <= elapsed < 0.6


async def test_a_failed_attempt_releases_the_key_to_exactly_one_waiter(
    store: IdempotencyStore,
) -> None:
    owner = await store.begin("acme", "flaky", FP)
    assert isinstance(owner, Begun)
    waiters = [
        asyncio.create_task(attempt(store, "acme", "flaky", 0.1, timeout_s=5)) for _ in range(10)
    ]
    await asyncio.sleep(0.1)
    assert not await store.release("acme", "flaky", "not-the-token")
    assert await store.release("acme", "flaky", owner.token)  # the upstream call failed
    results = await asyncio.gather(*waiters)
    kinds = [kind for kind, _ in results]
    assert kinds.count("ran") == 1, kinds
    assert kinds.count("replayed") == 9, kinds
    assert len({body for _, body in results}) == 1


async def test_a_killed_owner_holds_the_key_only_until_its_lease_expires(
    store: IdempotencyStore,
) -> None:
    proc = await spawn("own", store.redis.url, "acme", "orphan", "0.5")
    try:
        assert await read_line(proc) == "Begun"
    finally:
        proc.kill()  # the gateway dies mid-request
        await proc.wait()
    began = time.monotonic()
    assert isinstance(await store.begin("acme", "orphan", FP), Running)  # still leased
    outcome = await store.wait("acme", "orphan", FP, timeout_s=3)
    assert isinstance(outcome, Begun)  # taken over once the lease lapsed
    assert time.monotonic() - began < 1.5
    assert await store.complete("acme", "orphan", outcome.token, response(b"{}"))


async def test_renewal_keeps_a_long_request_s_key(redis_client: RedisClient) -> None:
    store = IdempotencyStore(redis_client, lease_s=0.3)
    owner = await store.begin("acme", "long", FP)
    assert isinstance(owner, Begun)
    async with store.renewer("acme", "long", owner.token):
        # Three leases long: without renewal a waiter would take the key over.
        assert isinstance(await store.wait("acme", "long", FP, timeout_s=0.9), Conflict)
    assert await store.complete("acme", "long", owner.token, response(b'{"long": 1}'))
    assert await store.begin("acme", "long", FP) == Replay(response(b'{"long": 1}'))


async def test_tenants_cannot_see_or_touch_each_other_s_keys(
    store: IdempotencyStore, redis_url: str
) -> None:
    key = "shared-client-key-7f3"
    a = await store.begin("tenant-a", key, FP)
    assert isinstance(a, Begun)
    assert await store.complete("tenant-a", key, a.token, response(b'{"secret": "a"}'))

    # Tenant B with the same key and body finds nothing: its own request runs.
    b = await store.begin("tenant-b", key, FP)
    assert isinstance(b, Begun)
    # B with another body is no mismatch against A's record either.
    assert isinstance(await store.begin("tenant-c", key, fingerprint({"x": 1})), Begun)
    # A's token means nothing in B's scope, and B cannot overwrite or release A's record.
    assert not await store.complete("tenant-b", key, a.token, response(b"poison"))
    assert not await store.release("tenant-b", key, a.token)
    assert not await store.complete("tenant-a", key, b.token, response(b"poison"))
    assert not await store.release("tenant-a", key, b.token)
    assert await store.complete("tenant-b", key, b.token, response(b'{"secret": "b"}'))

    assert await store.begin("tenant-a", key, FP) == Replay(response(b'{"secret": "a"}'))
    assert await store.begin("tenant-b", key, FP) == Replay(response(b'{"secret": "b"}'))
    # Neither the tenant nor the client's key appears in Redis.
    with redis.Redis.from_url(redis_url) as raw:
        names = [name.decode() for name in raw.scan_iter()]
    assert len(names) == 3
    assert all(name.startswith("tollway:idem:{") for name in names)
    assert not any("tenant" in name or key in name for name in names)


async def test_redis_down_means_unprotected_fast() -> None:
    with run_redis() as server:
        server.stop()
        client = RedisClient(server.url, call_budget_s=0.05, backoff_s=5.0)
        await client.start()
        try:
            store = IdempotencyStore(client, lease_s=0.03)
            began = time.monotonic()
            assert isinstance(await store.begin("acme", "k", FP), Unprotected)
            assert isinstance(await store.wait("acme", "k", FP, timeout_s=5), Unprotected)
            assert not await store.complete("acme", "k", "token", response(b"{}"))
            assert not await store.release("acme", "k", "token")
            async with store.renewer("acme", "k", "token"):
                await asyncio.sleep(0.05)  # a few failed renewals, none raised
            assert time.monotonic() - began < 0.5
            assert client.failures >= 5
        finally:
            await client.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
