"""Server-Sent Events exactly as vLLM sends them, and what a disconnect does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
import openai

from sim.server import SimServer
from sim.textgen import count_tokens

ClientFactory = Callable[..., openai.AsyncOpenAI]
StartSim = Callable[..., Awaitable[SimServer]]
Stats = Callable[[SimServer], Awaitable[dict[str, Any]]]
WaitFor = Callable[..., Awaitable[None]]

MESSAGES: Any = [{"role": "user", "content": "Tell me about toll roads."}]


async def test_chat_stream_without_usage(sim: SimServer, openai_client: ClientFactory) -> None:
    client = openai_client(sim)
    full = await client.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=9)
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="sim-model", messages=MESSAGES, max_tokens=9, stream=True
        )
    ]
    first, *middle, last = chunks
    assert first.object == "chat.completion.chunk"
    assert first.id.startswith("chatcmpl-")
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert all(c.id == first.id and c.model == "sim-model" for c in chunks)
    assert all(c.usage is None for c in chunks)
    # One chunk per token; the last token's chunk carries finish_reason, as in vLLM.
    assert len(middle) + 1 == 9
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert last.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content


async def test_chat_stream_with_include_usage(sim: SimServer, openai_client: ClientFactory) -> None:
    client = openai_client(sim)
    stream = await client.chat.completions.create(
        model="sim-model",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *body, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == "stop"
    content_chunks = [c for c in body if c.choices[0].delta.content]
    assert usage_chunk.usage.completion_tokens == len(content_chunks)
    # 4 template tokens per message, then the content, 3 for the generation prompt.
    assert usage_chunk.usage.prompt_tokens == 4 + count_tokens(MESSAGES[0]["content"]) + 3
    assert usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )


async def test_continuous_usage_stats_on_every_chunk(
    sim: SimServer, openai_client: ClientFactory
) -> None:
    client = openai_client(sim)
    stream = await client.chat.completions.create(
        model="sim-model",
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        # vLLM's extension, unknown to the SDK's types.
        stream_options=cast(Any, {"include_usage": True, "continuous_usage_stats": True}),
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is not None for c in chunks)
    completion = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert completion == [0, 1, 2, 3, 4, 5, 6, 6]  # role chunk, 6 tokens, the usage chunk
    assert chunks[-1].choices == []


async def test_raw_sse_framing(sim: SimServer, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "prompt": "abc", "max_tokens": 4, "stream": True}
    async with http.post(f"{sim.base_url}/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert len(payloads) == 4
    assert all(p["object"] == "text_completion" and p["id"].startswith("cmpl-") for p in payloads)
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None, None, None, "length"]
    assert all(p["choices"][0]["logprobs"] is None for p in payloads)
    assert "usage" not in payloads[0]


async def test_completion_stream_with_usage(sim: SimServer, openai_client: ClientFactory) -> None:
    client = openai_client(sim)
    stream = await client.completions.create(
        model="sim-model",
        prompt="Once upon a time",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 4 + ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


async def test_stream_with_n_streams_each_choice(
    sim: SimServer, openai_client: ClientFactory
) -> None:
    client = openai_client(sim)
    stream = await client.chat.completions.create(
        model="sim-model",
        messages=MESSAGES,
        n=2,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    finishes: list[tuple[int, str]] = []
    usage_tokens = None
    async for chunk in stream:
        if not chunk.choices:
            assert chunk.usage is not None
            usage_tokens = chunk.usage.completion_tokens
            continue
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes.append((choice.index, choice.finish_reason))
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert texts[0] != texts[1]
    assert usage_tokens == 6


async def test_client_disconnect_frees_the_slot(
    start_sim: StartSim, http: aiohttp.ClientSession, stats: Stats, wait_for: WaitFor
) -> None:
    # One slot, 10 ms steps: the first request would hold it for ~10 s.
    sim = await start_sim(max_num_seqs=1, decode_base_ms=10.0)
    body = {"model": "sim-model", "prompt": "x", "max_tokens": 1000, "ignore_eos": True}
    resp = await http.post(f"{sim.base_url}/completions", json={**body, "stream": True})
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")
    await resp.content.readuntil(b"\n\n")
    assert (await stats(sim))["running"] == 1
    resp.close()  # drop the connection mid-stream

    async def freed() -> bool:
        s = await stats(sim)
        return bool(s["running"] == 0 and s["requests_aborted"] == 1 and s["in_flight"] == 0)

    await wait_for(freed, within=1.0)
    # The slot is usable again straight away.
    short = {**body, "max_tokens": 2}
    async with http.post(f"{sim.base_url}/completions", json=short) as again:
        assert again.status == 200
        assert (await again.json())["usage"]["completion_tokens"] == 2
    final = await stats(sim)
    assert final["max_waiting_seen"] == 0
    assert final["requests_finished"] == 1


async def test_disconnect_while_queued_or_not_streaming_aborts(
    start_sim: StartSim, http: aiohttp.ClientSession, stats: Stats, wait_for: WaitFor
) -> None:
    sim = await start_sim(max_num_seqs=1, decode_base_ms=10.0)
    body = {"model": "sim-model", "prompt": "x", "max_tokens": 1000, "ignore_eos": True}
    timeout = aiohttp.ClientTimeout(total=0.3)

    async def give_up() -> None:
        with contextlib.suppress(TimeoutError):
            async with http.post(f"{sim.base_url}/completions", json=body, timeout=timeout):
                pass

    # The first holds the only slot, the second waits for it; both give up.
    calls = asyncio.gather(give_up(), give_up())

    async def queued() -> bool:
        s = await stats(sim)
        return bool(s["running"] == 1 and s["waiting"] == 1)

    await wait_for(queued, within=1.0)
    await calls

    async def gone() -> bool:
        s = await stats(sim)
        return bool(s["running"] == 0 and s["waiting"] == 0 and s["requests_aborted"] == 2)

    await wait_for(gone, within=1.0)
