"""Fault injection, set at start or at runtime through /sim/faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from sim.faults import FaultSettings
from sim.server import SimServer

ClientFactory = Callable[..., openai.AsyncOpenAI]
StartSim = Callable[..., Awaitable[SimServer]]
Stats = Callable[[SimServer], Awaitable[dict[str, Any]]]
WaitFor = Callable[..., Awaitable[None]]

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def _set_faults(
    http: aiohttp.ClientSession, sim: SimServer, **changes: Any
) -> dict[str, Any]:
    async with http.post(f"{sim.url}/sim/faults", json=changes) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_error_rate_one_fails_every_request_and_can_be_cleared(
    sim: SimServer, http: aiohttp.ClientSession, openai_client: ClientFactory, stats: Stats
) -> None:
    settings = await _set_faults(http, sim, error_rate=1.0)
    assert settings["error_rate"] == 1.0
    async with http.get(f"{sim.url}/sim/faults") as resp:
        assert (await resp.json()) == settings
    for _ in range(5):
        async with http.post(f"{sim.base_url}/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
            assert await resp.json() == {
                "error": {
                    "message": "Simulated failure (fault injection)",
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                }
            }
    with pytest.raises(openai.InternalServerError):
        await openai_client(sim).chat.completions.create(**CHAT)  # type: ignore[call-overload]

    await _set_faults(http, sim, error_status=503)
    async with http.post(f"{sim.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "ServiceUnavailableError"

    async with http.delete(f"{sim.url}/sim/faults") as resp:
        assert await resp.json() == FaultSettings().model_dump()
    async with http.post(f"{sim.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    s = await stats(sim)
    assert (s["requests_failed"], s["requests_finished"]) == (7, 1)


async def test_invalid_fault_settings_are_rejected(
    sim: SimServer, http: aiohttp.ClientSession
) -> None:
    for bad in ({"error_rate": 2}, {"error_status": 200}, {"no_such_fault": 1}):
        async with http.post(f"{sim.url}/sim/faults", json=bad) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "BadRequestError"
    async with http.get(f"{sim.url}/sim/faults") as resp:
        assert (await resp.json()) == FaultSettings().model_dump()


async def test_fractional_error_rate_is_seeded(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    async def statuses(seed: int) -> list[int]:
        sim = await start_sim(seed=seed, faults=FaultSettings(error_rate=0.5))
        out = []
        for _ in range(40):
            async with http.post(f"{sim.base_url}/chat/completions", json=CHAT) as resp:
                out.append(resp.status)
        return out

    first = await statuses(1)
    assert 5 < first.count(500) < 35
    assert set(first) == {200, 500}
    assert await statuses(1) == first  # same seed, same failures


async def test_added_latency_delays_the_response(
    sim: SimServer, http: aiohttp.ClientSession
) -> None:
    await _set_faults(http, sim, added_latency_ms=200)
    start = time.monotonic()
    async with http.post(f"{sim.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 0.2


async def test_hang_holds_until_the_client_gives_up(
    sim: SimServer, http: aiohttp.ClientSession, stats: Stats, wait_for: WaitFor
) -> None:
    await _set_faults(http, sim, hang_rate=1.0)
    with pytest.raises(TimeoutError):
        async with http.post(
            f"{sim.base_url}/chat/completions",
            json=CHAT,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass

    # The handler ended (its outcome is counted) and nothing is left in flight.
    async def released() -> bool:
        s = await stats(sim)
        return bool(s["requests_aborted"] == 1 and s["in_flight"] == 0)

    await wait_for(released, within=1.0)
    assert (await stats(sim))["requests_hung"] == 1


async def test_shutdown_releases_hung_requests(
    start_sim: StartSim, http: aiohttp.ClientSession, wait_for: WaitFor
) -> None:
    sim = await start_sim(faults=FaultSettings(hang_rate=1.0))
    call = asyncio.ensure_future(http.post(f"{sim.base_url}/chat/completions", json=CHAT))

    async def hanging() -> bool:
        return sim.state.stats.in_flight == 1

    await wait_for(hanging)
    start = time.monotonic()
    await sim.close()
    assert time.monotonic() - start < 1.0  # not the 5 s shutdown timeout
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call
    assert sim.state.stats.dropped == 1


async def test_die_mid_stream_cuts_the_connection_without_done(
    sim: SimServer, http: aiohttp.ClientSession, openai_client: ClientFactory, stats: Stats
) -> None:
    await _set_faults(http, sim, die_mid_stream_rate=1.0, die_after_tokens=3)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events: list[bytes] = []

    async def read_events() -> None:
        async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.strip():
                    events.append(line.strip())

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_events()
    # The role chunk, then exactly three tokens, then nothing: no usage, no [DONE].
    assert len(events) == 4
    assert all(e.startswith(b"data: {") for e in events)

    client = openai_client(sim)
    received: list[Any] = []

    async def read_chunks() -> None:
        async for chunk in await client.chat.completions.create(**body):  # type: ignore[call-overload]
            received.append(chunk)

    with pytest.raises(openai.APIError):
        await read_chunks()
    assert len(received) == 4

    # A non-streaming request gets no answer at all.
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    s = await stats(sim)
    assert (s["requests_dropped"], s["running"]) == (3, 0)


async def test_unhealthy_health_check(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await _set_faults(http, sim, unhealthy=True)
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 503
    await _set_faults(http, sim, unhealthy=False)
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 200
