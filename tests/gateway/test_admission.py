"""Continuous-batching admission through a real gateway and simulator replicas.

The simulator behaves like vLLM: ``max_num_seqs`` running, the rest in its own
waiting queue, both visible on its ``/metrics``. The gateway must keep that
waiting queue empty by queueing (fairly), shedding and falling back itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import (
    KEY,
    OTHER_KEY,
    SdkFactory,
    Stack,
    detailed_ready,
    gateway_config,
    sim_stats,
)
from tests.support.metrics import scrape, value
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.watch import VllmWatcher

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about queues."}]
# 10 tokens per answer at ~20 ms a step: ~200 ms in a slot, the same for everyone.
STEADY_SIM = [
    "--decode-base-ms", "20", "--decode-per-seq-ms", "0",
    "--output-tokens-min", "10", "--output-tokens-max", "10",
]  # fmt: skip


def metric(gateway: Proc, name: str, **labels: str) -> float:
    return value(scrape(gateway.url), name, **labels)


def ask(client: openai.AsyncOpenAI, model: str = "sim-small", **kwargs: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=10, **kwargs
    )


def test_never_more_in_flight_than_slots_and_all_complete(stack: Stack) -> None:
    """16 concurrent requests on a 4-slot replica: 4 run, 12 wait in the gateway."""
    waits_before = metric(stack.gateway, "tollway_queue_wait_seconds_count", tier="small")

    async def burst() -> list[str]:
        async with stack.async_client() as client:
            completions = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="sim-small", messages=MESSAGES, max_tokens=24
                    )
                    for _ in range(16)
                )
            )
        return [c.choices[0].finish_reason for c in completions]

    with VllmWatcher(stack.small.url) as watcher:
        reasons = asyncio.run(burst())
    assert len(reasons) == 16
    assert all(reasons)
    assert watcher.samples > 3
    assert watcher.max_running <= 4
    assert watcher.max_waiting == 0  # the replica's own queue never held anything
    stats = sim_stats(stack.small)
    assert stats["max_running_seen"] == 4  # and its batch was full
    assert stats["requests_finished"] == 16
    waits = metric(stack.gateway, "tollway_queue_wait_seconds_count", tier="small")
    assert waits - waits_before == 16


def _fair_gateway(procs: list[Proc], log_dir: Path, **scheduling: Any) -> tuple[Proc, Proc]:
    sim = start_sim(log_dir, ["sim-small"], "--max-num-seqs", "2", *STEADY_SIM)
    procs.append(sim)
    large = start_sim(log_dir, ["sim-large"], *STEADY_SIM)
    procs.append(large)
    config = gateway_config([sim.url], [large.url])
    config["tiers"][0]["replicas"][0]["max_num_seqs"] = 2
    config["scheduling"] = {"deadline_ms": 60_000, **scheduling}
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)
    return gateway, sim


def test_two_tenants_saturating_a_tier_get_their_weighted_shares(
    procs: list[Proc], log_dir: Path
) -> None:
    gateway, sim = _fair_gateway(procs, log_dir, tenant_weights={"acme": 3, "globex": 1})
    done = {"acme": 0, "globex": 0}

    async def tenant(name: str, key: str, until: float) -> None:
        async with openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key=key, max_retries=0
        ) as client:
            await asyncio.gather(*(worker(client, name, until) for _ in range(6)))

    async def worker(client: openai.AsyncOpenAI, name: str, until: float) -> None:
        while time.monotonic() < until:
            await client.chat.completions.create(
                model="sim-small", messages=MESSAGES, max_tokens=10
            )
            if time.monotonic() < until:
                done[name] += 1

    async def both() -> None:
        until = time.monotonic() + 6
        await asyncio.gather(tenant("acme", KEY, until), tenant("globex", OTHER_KEY, until))

    with VllmWatcher(sim.url, every_s=0.05) as watcher:
        asyncio.run(both())
    total = done["acme"] + done["globex"]
    assert total > 30  # both saturated the 2 slots for the whole window
    share = done["acme"] / total
    assert 0.75 * 0.9 <= share <= 0.75 * 1.1, done
    assert watcher.max_running <= 2
    assert watcher.max_waiting == 0


def test_overload_is_shed_with_429_and_retry_after_and_nothing_hangs(
    procs: list[Proc], log_dir: Path
) -> None:
    gateway, sim = _fair_gateway(procs, log_dir, deadline_ms=400)

    async def one(client: openai.AsyncOpenAI) -> tuple[int, float, httpx.Headers, Any]:
        started = time.monotonic()
        try:
            raw = await ask(client)
            return 200, time.monotonic() - started, raw.headers, None
        except openai.RateLimitError as err:
            return 429, time.monotonic() - started, err.response.headers, err.body

    async def flood() -> list[tuple[int, float, httpx.Headers, Any]]:
        async with openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key=KEY, max_retries=0
        ) as client:
            await ask(client)  # one request first, so the tier knows its hold time
            return await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(30))), 30)

    with VllmWatcher(sim.url) as watcher:
        results = asyncio.run(flood())
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 429]
    assert ok  # the slots stayed busy...
    assert len(shed) >= 15  # ...and 2 slots x 200 ms cannot serve 30 within 400 ms
    for _, elapsed, headers, body in shed:
        assert int(headers["retry-after"]) >= 1
        assert elapsed < 0.4 + 0.5  # refused by the deadline, not after a long wait
        assert body["code"] == "queue_deadline_exceeded"
        assert "deadline" in body["message"]
    assert watcher.max_running <= 2
    assert watcher.max_waiting == 0
    assert metric(gateway, "tollway_shed_total", tier="small", reason="deadline") == len(shed)
    assert metric(gateway, "tollway_requests_total", status="429") == len(shed)
    assert metric(gateway, "tollway_queue_depth", tier="small") == 0  # nobody left behind


def test_client_deadline_header_and_priority_header_are_validated(stack: Stack) -> None:
    for headers in (
        {"x-tollway-deadline-ms": "soon"},
        {"x-tollway-deadline-ms": "0"},
        {"x-tollway-priority": "500"},
    ):
        with pytest.raises(openai.BadRequestError) as err:
            stack.client().chat.completions.create(
                model="sim-small", messages=MESSAGES, extra_headers=headers
            )
        assert "x-tollway-" in err.value.message
    ok = stack.client().chat.completions.create(
        model="sim-small",
        messages=MESSAGES,
        extra_headers={"x-tollway-deadline-ms": "5000", "x-tollway-priority": "-3"},
    )
    assert ok.choices[0].message.content


def test_forcing_a_tier_needs_a_key_allowed_to(
    procs: list[Proc], log_dir: Path, sdk: SdkFactory
) -> None:
    small = start_sim(log_dir, ["sim-small"], "--zero-delay")
    procs.append(small)
    large = start_sim(log_dir, ["sim-large"], "--zero-delay")
    procs.append(large)
    config = gateway_config([small.url], [large.url])
    config["auth"]["keys"][1]["force_tier"] = True  # globex may
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)
    allowed = sdk(gateway, OTHER_KEY)
    raw = allowed.chat.completions.with_raw_response.create(
        model="auto", messages=MESSAGES, extra_headers={"x-tollway-tier": "large"}
    )
    assert raw.headers["x-tollway-tier"] == "large"
    assert raw.headers["x-tollway-model"] == "sim-large"
    assert raw.headers["x-tollway-route-reason"] == "forced by x-tollway-tier"
    with pytest.raises(openai.BadRequestError, match="names no tier"):
        allowed.chat.completions.create(
            model="auto", messages=MESSAGES, extra_headers={"x-tollway-tier": "huge"}
        )
    refused = sdk(gateway, KEY)
    with pytest.raises(openai.PermissionDeniedError, match="x-tollway-tier"):
        refused.chat.completions.create(
            model="auto", messages=MESSAGES, extra_headers={"x-tollway-tier": "large"}
        )


def test_fallback_tier_when_unavailable_and_when_too_slow(
    procs: list[Proc], log_dir: Path, sdk: SdkFactory
) -> None:
    small = start_sim(log_dir, ["sim-small"], "--max-num-seqs", "1", *STEADY_SIM)
    procs.append(small)
    large = start_sim(log_dir, ["sim-large"], "--zero-delay")
    procs.append(large)
    config = gateway_config([small.url], [large.url])
    config["tiers"][0]["replicas"][0]["max_num_seqs"] = 1
    config["tiers"][0]["fallback"] = ["large"]
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)

    async def too_slow() -> Any:
        async with openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key=KEY, max_retries=0
        ) as client:
            return await too_slow_with(client)

    async def too_slow_with(client: openai.AsyncOpenAI) -> Any:
        await ask(client)  # teaches the tier its hold time (~200 ms)
        hog = asyncio.ensure_future(ask(client))
        queued = [asyncio.ensure_future(ask(client)) for _ in range(3)]
        await asyncio.sleep(0.05)
        hurried = await ask(client, extra_headers={"x-tollway-deadline-ms": "100"})
        await asyncio.gather(hog, *queued)
        return hurried

    hurried = asyncio.run(too_slow())
    assert hurried.headers["x-tollway-tier"] == "large"
    assert hurried.headers["x-tollway-model"] == "sim-large"
    assert hurried.headers["x-tollway-fallback-from"] == "small"
    assert hurried.headers["x-tollway-fallback-reason"] == "deadline"
    assert hurried.parse().model == "sim-large"

    small.stop()
    sync = sdk(gateway, KEY)
    raw = sync.chat.completions.with_raw_response.create(
        model="sim-small", messages=MESSAGES, max_tokens=5
    )
    assert raw.headers["x-tollway-tier"] == "large"
    assert raw.headers["x-tollway-fallback-reason"] == "unavailable"
    assert metric(gateway, "tollway_fallbacks_total", from_tier="small", to_tier="large") == 2


def test_replica_killed_is_ejected_traffic_moves_and_it_is_readmitted(
    procs: list[Proc], log_dir: Path, sdk: SdkFactory
) -> None:
    """Passive detection only (no health checks): ejection and timed re-admission."""
    survivor = start_sim(log_dir, ["sim-large"], "--zero-delay")
    procs.append(survivor)
    victim = start_sim(log_dir, ["sim-large"], "--zero-delay")
    small = start_sim(log_dir, ["sim-small"], "--zero-delay")
    procs.append(small)
    config = gateway_config([small.url], [victim.url, survivor.url])
    config["health"].update(interval_s=3600, ejection_s=0.3, max_ejection_s=0.6)
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)
    client = sdk(gateway, KEY)
    for _ in range(4):
        client.chat.completions.create(model="sim-large", messages=MESSAGES, max_tokens=3)
    assert sim_stats(victim)["requests_finished"] > 0

    port = int(victim.url.rsplit(":", 1)[1])
    victim.stop()
    for _ in range(10):  # every request succeeds: the dead replica is skipped or retried away
        client.chat.completions.create(model="sim-large", messages=MESSAGES, max_tokens=3)
    ejections = metric(gateway, "tollway_replica_ejections_total", replica=victim.url)
    assert ejections >= 1
    replicas = detailed_ready(gateway)["tiers"]["large"]["replicas"]
    assert "cannot connect" in (replicas[0]["error"] or "").lower()

    restarted = start_sim(log_dir, ["sim-large"], "--zero-delay", port=port)
    procs.append(restarted)
    deadline = time.monotonic() + 10
    while sim_stats(restarted)["requests_finished"] == 0:
        assert time.monotonic() < deadline, "the restarted replica was never re-admitted"
        client.chat.completions.create(model="sim-large", messages=MESSAGES, max_tokens=3)
        time.sleep(0.05)
    replicas = detailed_ready(gateway)["tiers"]["large"]["replicas"]
    assert replicas[0]["available"] is True
    assert metric(gateway, "tollway_replica_ejected", replica=victim.url) == 0
