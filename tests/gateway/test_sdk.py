"""The official openai SDK (sync, async, streaming) against the gateway and simulator replicas."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import Stack, http_json, sim_stats

MESSAGES: list[Any] = [{"role": "user", "content": "Name three rivers in Europe."}]


def received(stack: Stack) -> dict[str, int]:
    return {
        "small": sim_stats(stack.small)["requests_received_total"],
        "large": sum(sim_stats(s)["requests_received_total"] for s in stack.large),
    }


def recent_requests(stack: Stack) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for sim in stack.sims:
        out += http_json("GET", sim.url + "/sim/requests")
    return out


def test_chat_sync(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="sim-small", messages=MESSAGES, max_tokens=12
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "sim-small"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 12
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert raw.headers["x-tollway-tier"] == "small"
    assert raw.headers["x-tollway-model"] == "sim-small"
    assert raw.headers["x-request-id"].startswith("req_")
    assert received(stack) == {"small": 1, "large": 0}


def test_completions_sync(stack: Stack) -> None:
    completion = stack.client().completions.create(
        model="sim-large", prompt="Once upon a time", max_tokens=5
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 5
    assert received(stack) == {"small": 0, "large": 1}


async def test_async_concurrent_requests_all_succeed(stack: Stack) -> None:
    client = stack.async_client()
    async with client:
        results = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="sim-large",
                    messages=[{"role": "user", "content": f"question number {i}"}],
                    max_tokens=8,
                )
                for i in range(24)
            )
        )
    assert len({r.id for r in results}) == 24
    assert all(r.choices[0].message.content for r in results)
    counts = [sim_stats(s)["requests_finished"] for s in stack.large]
    assert sum(counts) == 24
    assert min(counts) > 0, f"least-loaded choice should use both large replicas: {counts}"


def test_stream_chat_with_usage(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model="sim-small",
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 10


async def test_stream_completions_async(stack: Stack) -> None:
    async with stack.async_client() as client:
        stream = await client.completions.create(
            model="sim-large", prompt="The weather today", max_tokens=6, stream=True
        )
        pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert "".join(pieces)
    assert len(pieces) >= 2  # relayed chunk by chunk, not as one blob


def test_models_lists_tier_models_and_aliases(stack: Stack) -> None:
    ids = [m.id for m in stack.client().models.list()]
    assert ids == ["sim-small", "sim-large", "auto"]


def test_auto_alias_is_routed_and_rewritten(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="auto", messages=MESSAGES, max_tokens=4
    )
    assert raw.parse().model == "sim-small"
    assert raw.headers["x-tollway-tier"] == "small"
    [sent] = recent_requests(stack)
    assert sent["body"]["model"] == "sim-small"


def test_unknown_fields_pass_through_untouched(stack: Stack) -> None:
    extra = {"top_k": 7, "repetition_penalty": 1.1, "guided_json": {"type": "object"}}
    stack.client().chat.completions.create(
        model="sim-small", messages=MESSAGES, max_tokens=4, extra_body=extra
    )
    [sent] = recent_requests(stack)
    body = sent["body"]
    assert {k: body[k] for k in extra} == extra
    assert body["messages"] == MESSAGES


def test_request_id_is_honoured_and_forwarded(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="sim-small",
        messages=MESSAGES,
        max_tokens=4,
        extra_headers={"x-request-id": "client-chosen-id-42"},
    )
    assert raw.headers["x-request-id"] == "client-chosen-id-42"
    [sent] = recent_requests(stack)
    assert sent["headers"]["x-request-id"] == "client-chosen-id-42"


def test_insane_request_id_is_replaced(stack: Stack) -> None:
    raw = stack.client().models.with_raw_response.list(
        extra_headers={"x-request-id": 'has spaces <and> quotes"'}
    )
    assert raw.headers["x-request-id"].startswith("req_")
