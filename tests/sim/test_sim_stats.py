"""/sim/stats and /sim/requests: exact counts a gateway's tests can rely on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai

from sim.server import SimServer

ClientFactory = Callable[..., openai.AsyncOpenAI]
StartSim = Callable[..., Awaitable[SimServer]]
Stats = Callable[[SimServer], Awaitable[dict[str, Any]]]


async def test_counts_are_exact_under_50_concurrent_requests(
    start_sim: StartSim, openai_client: ClientFactory, stats: Stats
) -> None:
    sim = await start_sim(max_num_seqs=16)
    client = openai_client(sim)
    usage = {"prompt": 0, "completion": 0}

    async def chat(i: int) -> None:
        resp = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=5
        )
        assert resp.usage is not None
        usage["prompt"] += resp.usage.prompt_tokens
        usage["completion"] += resp.usage.completion_tokens

    async def chat_stream(i: int) -> None:
        stream = await client.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": f"s{i}"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage["prompt"] += chunk.usage.prompt_tokens
                usage["completion"] += chunk.usage.completion_tokens

    async def text(i: int) -> None:
        resp = await client.completions.create(model="sim-model", prompt=f"t{i}", max_tokens=5)
        assert resp.usage is not None
        usage["prompt"] += resp.usage.prompt_tokens
        usage["completion"] += resp.usage.completion_tokens

    async def bad(i: int) -> None:
        try:
            await client.completions.create(model="missing", prompt="x", max_tokens=5)
        except openai.NotFoundError:
            return
        raise AssertionError("expected a 404")

    calls = [chat(i) for i in range(20)] + [chat_stream(i) for i in range(10)]
    calls += [text(i) for i in range(15)] + [bad(i) for i in range(5)]
    await asyncio.gather(*calls)

    s = await stats(sim)
    assert s["requests_received"] == {"/v1/chat/completions": 30, "/v1/completions": 20}
    assert s["requests_received_total"] == 50
    assert s["requests_finished"] == 45
    assert s["requests_rejected"] == 5
    assert s["requests_failed"] == s["requests_aborted"] == s["requests_dropped"] == 0
    assert (s["in_flight"], s["running"], s["waiting"]) == (0, 0, 0)
    assert s["max_running_seen"] == 16
    assert s["max_waiting_seen"] > 0
    assert s["prompt_tokens"] == usage["prompt"]
    assert s["completion_tokens"] == usage["completion"] == 45 * 5


async def test_recent_requests_show_what_was_sent(
    sim: SimServer, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": "Bearer sk-upstream", "X-Request-Id": "abc"}
    async with http.post(f"{sim.base_url}/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
    async with http.post(f"{sim.base_url}/completions", data=b"not json") as resp:
        assert resp.status == 400
    async with http.get(f"{sim.url}/sim/requests") as resp:
        recent = await resp.json()
    assert [r["endpoint"] for r in recent] == ["/v1/chat/completions", "/v1/completions"]
    assert recent[0]["body"] == body
    assert recent[0]["headers"]["authorization"] == "Bearer sk-upstream"
    assert recent[0]["headers"]["x-request-id"] == "abc"
    assert recent[1]["body"] == "not json"
    async with http.get(f"{sim.url}/sim/requests", params={"limit": "1"}) as resp:
        assert [r["endpoint"] for r in await resp.json()] == ["/v1/completions"]
    async with http.post(f"{sim.url}/sim/reset") as resp:
        assert resp.status == 200
    async with http.get(f"{sim.url}/sim/requests") as resp:
        assert await resp.json() == []
