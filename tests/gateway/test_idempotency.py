"""Idempotency-Key and in-flight coalescing across two gateway processes sharing Redis.

Upstream calls are counted from the simulator's own counters. The simulator
is slow on purpose (about half a second per answer) so that requests overlap.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from gateway.idempotent import replayed_events
from gateway.sse import chunk_of_event, event
from tests.conftest import KEY, OTHER_KEY, gateway_config, reset_sim, set_faults, sim_stats
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.redis_server import RedisServer, run_redis

SLOW = ["--decode-base-ms", "25", "--output-tokens-min", "16", "--output-tokens-max", "20"]


@dataclass
class Pair:
    a: Proc
    b: Proc
    sim: Proc
    redis: RedisServer
    log_dir: Path


def config(sim: Proc, redis: RedisServer, **idempotency: Any) -> dict[str, Any]:
    cfg = gateway_config([sim.url], [sim.url], redis.url)
    for tier in cfg["tiers"]:  # one simulator serves both tiers: one set of settings
        tier["replicas"][0].update(max_num_seqs=64, gpu_hourly_usd=1.0)
    cfg["idempotency"] = {"wait_s": 20, "lease_s": 2, **idempotency}
    # These tests are about idempotency, not fail-open: on a loaded 2-core machine a
    # Redis call can pass the 50 ms default budget, and the key would go unprotected.
    cfg["redis"]["call_budget_ms"] = 2000
    cfg["upstream"]["first_byte_timeout_s"] = 30
    return cfg


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    log_dir = tmp_path_factory.mktemp("idem")
    with run_redis() as redis:
        sim = start_sim(log_dir, ["sim-small", "sim-large"], "--max-num-seqs", "64", *SLOW)
        cfg = config(sim, redis)
        a, b = start_gateway(log_dir, cfg), start_gateway(log_dir, cfg)
        try:
            yield Pair(a, b, sim, redis, log_dir)
        finally:
            for proc in (a, b, sim):
                proc.stop()


@pytest.fixture
def two(pair: Pair) -> Pair:
    reset_sim(pair.sim)
    return pair


def body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-small", "messages": [{"role": "user", "content": content}],
            "max_tokens": 20, **extra}  # fmt: skip


def post(gateway: Proc, payload: dict[str, Any], key: str | None, api_key: str = KEY,
         timeout: float = 30) -> httpx.Response:  # fmt: skip
    headers = {"authorization": f"Bearer {api_key}"}
    if key is not None:
        headers["idempotency-key"] = key
    return httpx.post(gateway.url + "/v1/chat/completions", json=payload, headers=headers,
                      timeout=timeout)  # fmt: skip


async def burst(gateways: list[Proc], payload: dict[str, Any], key: str | None,
                n: int = 50) -> list[httpx.Response]:  # fmt: skip
    headers = {"authorization": f"Bearer {KEY}"}
    if key is not None:
        headers["idempotency-key"] = key
    limits = httpx.Limits(max_connections=n)
    urls = [gateways[i % len(gateways)].url + "/v1/chat/completions" for i in range(n)]
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(url, json=payload, headers=headers) for url in urls)
        )


def upstream_calls(sim: Proc) -> int:
    calls: int = sim_stats(sim)["requests_received_total"]
    return calls


async def test_fifty_retries_across_two_gateways_run_once(two: Pair) -> None:
    payload = body(f"idem {uuid.uuid4()}", temperature=0.9)  # sampled: the cache stays out
    responses = await burst([two.a, two.b], payload, key=f"key-{uuid.uuid4()}")
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.content for r in responses}) == 1  # 50 identical bodies
    assert upstream_calls(two.sim) == 1
    replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 49
    assert all(Decimal(r.headers["x-tollway-cost-usd"]) == 0 for r in replayed)
    first = next(r for r in responses if "idempotent-replayed" not in r.headers)
    assert {r.headers["x-tollway-cost-saved-usd"] for r in replayed} == {
        first.headers["x-tollway-cost-usd"]
    }


async def test_fifty_identical_cacheable_requests_go_upstream_once(two: Pair) -> None:
    payload = body(f"coalesce {uuid.uuid4()}", temperature=0)
    responses = await burst([two.a, two.b], payload, key=None)
    assert [r.status_code for r in responses] == [200] * 50
    assert upstream_calls(two.sim) == 1
    statuses = sorted(r.headers["x-tollway-cache"] for r in responses)
    assert statuses.count("miss") == 1
    assert set(statuses) <= {"miss", "coalesced", "hit"}
    texts = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(texts) == 1
    followers = [r for r in responses if r.headers["x-tollway-cache"] != "miss"]
    assert all(Decimal(r.headers["x-tollway-cost-usd"]) == 0 for r in followers)


def test_stream_is_replayed_as_a_stream(two: Pair) -> None:
    key = f"stream-{uuid.uuid4()}"
    client = openai.OpenAI(base_url=two.a.url + "/v1", api_key=KEY, max_retries=0)
    kwargs: dict[str, Any] = {
        "model": "sim-small", "messages": [{"role": "user", "content": f"s {uuid.uuid4()}"}],
        "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.7, "extra_headers": {"idempotency-key": key},
    }  # fmt: skip
    first = list(client.chat.completions.create(**kwargs))
    with client.chat.completions.with_streaming_response.create(**kwargs) as raw:
        assert raw.headers["idempotent-replayed"] == "true"
        replay = list(raw.parse())
    text = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            for chunks in (first, replay)]  # fmt: skip
    assert text[0] == text[1]
    assert text[0]
    figures = (replay[-1].model_extra or {})["tollway"]
    assert (figures["cache"], figures["cost_usd"]) == ("replay", "0.000000000")
    assert upstream_calls(two.sim) == 1


def test_same_key_other_body_is_422(two: Pair) -> None:
    key = f"mismatch-{uuid.uuid4()}"
    assert post(two.a, body("one", temperature=0.5), key).status_code == 200
    response = post(two.b, body("two", temperature=0.5), key)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"


def test_other_tenant_with_the_same_key_runs_independently(two: Pair) -> None:
    key = f"tenant-{uuid.uuid4()}"
    payload = body("isolated", temperature=0.5)
    assert post(two.a, payload, key, api_key=KEY).status_code == 200
    other = post(two.a, payload, key, api_key=OTHER_KEY)
    assert other.status_code == 200
    assert "idempotent-replayed" not in other.headers
    assert upstream_calls(two.sim) == 2


def test_failed_first_attempt_releases_the_key(two: Pair) -> None:
    key = f"fail-{uuid.uuid4()}"
    payload = body("fails first", temperature=0.5)
    set_faults(two.sim, error_rate=1.0, error_status=500)
    assert post(two.a, payload, key).status_code == 502
    set_faults(two.sim, error_rate=0.0)
    retry = post(two.b, payload, key)
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers  # it ran, it was not replayed
    assert sim_stats(two.sim)["requests_finished"] == 1


def test_in_flight_past_the_wait_bound_is_409(two: Pair) -> None:
    impatient = start_gateway(two.log_dir, config(two.sim, two.redis, wait_s=0.3))
    key = f"busy-{uuid.uuid4()}"
    payload = body("slow one", temperature=0.5)
    set_faults(two.sim, added_latency_ms=2000)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, two.a, payload, key)  # runs for about 2 s
            time.sleep(0.5)
            conflict = post(impatient, payload, key)
            assert conflict.status_code == 409
            assert conflict.json()["error"]["code"] == "idempotency_key_in_use"
            assert int(conflict.headers["retry-after"]) >= 1
            assert first.result().status_code == 200
    finally:
        impatient.stop()
    assert upstream_calls(two.sim) == 1


def test_a_killed_gateway_holds_the_key_only_until_its_lease(two: Pair) -> None:
    doomed = start_gateway(two.log_dir, config(two.sim, two.redis))
    key = f"killed-{uuid.uuid4()}"
    payload = body("orphaned", temperature=0.5)
    set_faults(two.sim, added_latency_ms=3000)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, doomed, payload, key)
        time.sleep(0.5)  # the key is taken, its lease renewed
        doomed.stop(signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            first.result()
    set_faults(two.sim, added_latency_ms=0)
    started = time.monotonic()
    retry = post(two.b, payload, key)
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers  # the retry ran
    assert time.monotonic() - started < 10  # lease_s is 2: no key is stuck


async def test_a_replayed_stream_says_what_the_replay_cost_or_nothing_with_metering_off() -> None:
    # A stream stored while metering was on carries its tollway object; a replay
    # replaces it with the replay's own figures, or drops it once metering is off.
    stored = [
        event({"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
        event(
            {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3}, "tollway": {"cost_usd": "1"}}
        ),
        b"data: [DONE]\n\n",
    ]

    async def replay(figures: dict[str, object] | None) -> list[bytes]:
        return [raw async for raw in replayed_events(stored, figures)]

    saved = await replay({"cost_usd": "0.000000000", "cache": "replay"})
    assert saved[0] == stored[0]
    assert saved[2] == stored[2]
    assert chunk_of_event(saved[1]) == {
        "id": "c1", "choices": [], "usage": {"prompt_tokens": 3},
        "tollway": {"cost_usd": "0.000000000", "cache": "replay"},
    }  # fmt: skip
    off = await replay(None)
    assert off[0] == stored[0]
    assert chunk_of_event(off[1]) == {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3}}
