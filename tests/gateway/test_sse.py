"""Streams to completions and back; the synthesized stream is what the openai SDK expects."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import (
    DONE,
    CompletionBuilder,
    chunk_of_event,
    chunks_from_completion,
    completion_from_chunks,
    parse_events,
)

USAGE = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}


def chat(*choices: dict[str, Any], usage: dict[str, Any] | None = USAGE) -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1_760_000_000,
        "model": "llama-8b",
        "choices": [{"index": i, **c} for i, c in enumerate(choices)],
        "usage": usage,
    }


def text_completion(*texts: str, usage: dict[str, Any] | None = USAGE) -> dict[str, Any]:
    return {
        "id": "cmpl-abc",
        "object": "text_completion",
        "created": 1_760_000_000,
        "model": "llama-8b",
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": "length"}
            for i, t in enumerate(texts)
        ],
        "usage": usage,
    }


def answer(content: str | None, finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {
        "message": {"role": "assistant", "content": content, **message},
        "logprobs": None,
        "finish_reason": finish,
    }


TOOL_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    },
    {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
    },
]
LONG = "The quick brown fox jumps over the lazy dog, then naps. " * 5


def round_trip(completion: dict[str, Any], **kwargs: Any) -> dict[str, Any] | None:
    events = chunks_from_completion(completion, include_usage=True, **kwargs)
    return completion_from_chunks(parse_events(b"".join(events)))


@pytest.mark.parametrize(
    "completion",
    [
        chat(answer(LONG)),
        chat(answer("")),
        chat(answer("Né à Zürich 🦊", "length")),
        chat(answer(None, "tool_calls", tool_calls=TOOL_CALLS)),
        chat(answer("Let me check.", "tool_calls", tool_calls=TOOL_CALLS[:1])),
        chat(answer("Paris.", reasoning_content="The capital of France is Paris. " * 3)),
        chat(answer(LONG), answer("Short.", "length")),  # n=2
        chat(answer(None, "tool_calls", tool_calls=TOOL_CALLS), answer("No tools.")),
        chat(answer("x"), usage=None),
        {**chat(answer("fp")), "system_fingerprint": "fp_1"},
        chat({**answer("stopped"), "stop_reason": "\n\n"}),
        chat(
            {
                **answer("Hi"),
                "logprobs": {
                    "content": [
                        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
                    ]
                },
            }
        ),
        text_completion(LONG),
        text_completion("", "second"),
    ],
    ids=lambda c: "-".join(
        str(ch.get("message", {}).get("content") or ch.get("text") or "")[:10]
        for ch in c["choices"]
    ),
)
def test_round_trip_is_the_identity(completion: dict[str, Any]) -> None:
    assert round_trip(completion) == completion
    assert round_trip(completion, chunk_chars=1) == completion


def test_chat_stream_shape() -> None:
    events = chunks_from_completion(chat(answer("abcdefgh")), include_usage=True, chunk_chars=3)
    assert events[-1] == DONE
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    chunks = [chunk_of_event(e) for e in events[:-1]]
    assert all(c is not None for c in chunks)
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks if c} == {
        ("chatcmpl-abc", "chat.completion.chunk", 1_760_000_000, "llama-8b")
    }
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1] if c]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "abc"},
        {"content": "def"},
        {"content": "gh"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c] == [None] * 4 + ["stop"]
    assert chunks[-1] == {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1_760_000_000,
        "model": "llama-8b",
        "choices": [],
        "usage": USAGE,
    }


def test_without_include_usage_there_is_no_usage_chunk() -> None:
    events = chunks_from_completion(chat(answer("hello")), include_usage=False)
    chunks = parse_events(b"".join(events))
    assert all(c["choices"] and "usage" not in c for c in chunks)
    rebuilt = completion_from_chunks(chunks)
    assert rebuilt == chat(answer("hello"), usage=None)


def test_text_completion_stream_shape() -> None:
    events = chunks_from_completion(text_completion("abcd"), include_usage=False, chunk_chars=2)
    chunks = parse_events(b"".join(events))
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert [c["choices"][0]["text"] for c in chunks] == ["ab", "cd", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


def test_tool_calls_stream_name_first_then_argument_pieces() -> None:
    completion = chat(answer(None, "tool_calls", tool_calls=TOOL_CALLS[:1]))
    events = chunks_from_completion(completion, include_usage=False, chunk_chars=16)
    deltas = [c["choices"][0]["delta"] for c in parse_events(b"".join(events))]
    assert deltas[0] == {"role": "assistant", "content": None}  # as OpenAI streams tool calls
    assert deltas[1] == {
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "index": 0,
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1]]
    assert pieces == ['{"city": "Paris"', ', "unit": "celsi', 'us"}']
    assert all(d["tool_calls"][0] == {"index": 0, "function": {"arguments": p}}
               for d, p in zip(deltas[2:-1], pieces, strict=True))  # fmt: skip


def test_n2_choices_are_interleaved() -> None:
    completion = chat(answer("aaaa"), answer("bbbbbb"))
    events = chunks_from_completion(completion, include_usage=False, chunk_chars=2)
    indexes = [c["choices"][0]["index"] for c in parse_events(b"".join(events))]
    assert indexes == [0, 1, 0, 1, 0, 1, 0, 1, 1]


def vllm_chunk(
    choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-vllm",
        "object": "chat.completion.chunk",
        "created": 1_760_000_001,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def delta(index: int, finish: str | None = None, **body: Any) -> dict[str, Any]:
    return {
        "index": index,
        "delta": body,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": None,
    }


def usage(completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": 9, "completion_tokens": completion_tokens,
            "total_tokens": 9 + completion_tokens}  # fmt: skip


# What vLLM streams with continuous_usage_stats, n=2, a parallel tool call whose
# fragments arrive in one chunk, and the gateway's figures on the last chunk.
VLLM_STREAM = [
    vllm_chunk([delta(0, role="assistant", content="")], usage(0)),
    vllm_chunk([delta(1, role="assistant", content="")], usage(0)),
    vllm_chunk([delta(0, content="Hel")], usage(1)),
    vllm_chunk(
        [
            delta(
                1,
                tool_calls=[
                    {
                        "index": 0,
                        "id": "chatcmpl-tool-1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": None},
                    },
                    {"index": 0, "function": {"arguments": '{"q": '}},
                ],
            )
        ],
        usage(2),
    ),
    vllm_chunk([delta(0, content="lo")], usage(3)),
    vllm_chunk([delta(1, tool_calls=[{"index": 0, "function": {"arguments": '"x"}'}}])], usage(4)),
    vllm_chunk([delta(0, "stop", content="!")], usage(5)),
    vllm_chunk([{**delta(1, "tool_calls"), "stop_reason": 128008}], usage(6)),
    {**vllm_chunk([], usage(6)), "tollway": {"cost_usd": "0.000001000"}},
]


def test_a_vllm_stream_adds_up_to_its_completion() -> None:
    before = copy.deepcopy(VLLM_STREAM)
    completion = completion_from_chunks(VLLM_STREAM)
    assert before == VLLM_STREAM  # the chunks are not modified
    assert completion == {
        "id": "chatcmpl-vllm",
        "object": "chat.completion",
        "created": 1_760_000_001,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "logprobs": None,
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "chatcmpl-tool-1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": '{"q": "x"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
                "stop_reason": 128008,
            },
        ],
        "usage": usage(6),  # the last chunk that carried usage
    }


def test_the_builder_takes_raw_events_and_ignores_done() -> None:
    builder = CompletionBuilder()
    for chunk in VLLM_STREAM:
        builder.add_event(b"data: " + orjson.dumps(chunk) + b"\n\n")
    builder.add_event(b": keep-alive\n\n")
    builder.add_event(DONE)
    assert builder.build() == completion_from_chunks(VLLM_STREAM)


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        VLLM_STREAM[:-3],  # choice 1 never finished
        [c for c in VLLM_STREAM if c["choices"][:1] != [] and c["choices"][0]["index"] == 1],
        [*VLLM_STREAM[:-1], {"error": {"message": "boom", "type": "server_error"}}],
        [*VLLM_STREAM[:-1], {"object": "error", "message": "boom", "type": "x", "code": 500}],
        [vllm_chunk([], usage(3))],
    ],
    ids=["empty", "unfinished", "gap-in-indexes", "error-event", "old-vllm-error", "no-choices"],
)
def test_an_incomplete_stream_gives_none(chunks: list[dict[str, Any]]) -> None:
    assert completion_from_chunks(chunks) is None


def test_parse_events_tolerates_crlf_and_data_without_space() -> None:
    body = b'data:{"a": 1}\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    assert parse_events(body) == [{"a": 1}]
    assert chunk_of_event(b"data: not json\n\n") is None
    assert chunk_of_event(b"data: [1, 2]\n\n") is None


def test_chunk_chars_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_chars"):
        chunks_from_completion(chat(answer("x")), include_usage=False, chunk_chars=0)


# -- property: completion -> chunks -> parse -> completion is the identity ------

_text = st.text(max_size=60)
_float = st.floats(allow_nan=False, allow_infinity=False, width=64)
_tool_call = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=12),
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.text(max_size=12), "arguments": _text}),
    }
)
_top_logprob = st.fixed_dictionaries(
    {"token": _text, "logprob": _float, "bytes": st.none() | st.lists(st.integers(0, 255))}
)
_chat_logprobs = st.none() | st.fixed_dictionaries(
    {
        "content": st.lists(
            st.fixed_dictionaries(
                {
                    "token": _text,
                    "logprob": _float,
                    "bytes": st.lists(st.integers(0, 255), max_size=4),
                    "top_logprobs": st.lists(_top_logprob, max_size=2),
                }
            ),
            max_size=3,
        )
    }
)
_message = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": st.none() | _text},
    optional={
        "reasoning_content": _text,
        "tool_calls": st.lists(_tool_call, min_size=1, max_size=3),
    },
)
_chat_choice = st.fixed_dictionaries(
    {
        "message": _message,
        "logprobs": _chat_logprobs,
        "finish_reason": st.sampled_from(["stop", "length", "tool_calls"]),
    },
    optional={"stop_reason": st.integers(0, 200_000) | st.text(min_size=1, max_size=4)},
)
_text_logprobs = st.none() | st.fixed_dictionaries(
    {
        "tokens": st.lists(_text, max_size=3),
        "token_logprobs": st.lists(st.none() | _float, max_size=3),
        "top_logprobs": st.lists(
            st.none() | st.dictionaries(st.text(max_size=4), _float, max_size=2), max_size=3
        ),
        "text_offset": st.lists(st.integers(0, 10_000), max_size=3),
    }
)
_text_choice = st.fixed_dictionaries(
    {
        "text": _text,
        "logprobs": _text_logprobs,
        "finish_reason": st.sampled_from(["stop", "length"]),
    }
)
_usage = st.none() | st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 10**6),
        "completion_tokens": st.integers(0, 10**6),
        "total_tokens": st.integers(0, 2 * 10**6),
    }
)


@st.composite
def completions(draw: st.DrawFn) -> dict[str, Any]:
    is_chat = draw(st.booleans())
    choices: list[dict[str, Any]] = draw(
        st.lists(_chat_choice if is_chat else _text_choice, min_size=1, max_size=3)
    )
    completion: dict[str, Any] = {
        "id": draw(st.text(min_size=1, max_size=20)),
        "object": "chat.completion" if is_chat else "text_completion",
        "created": draw(st.integers(0, 2**40)),
        "model": draw(st.text(min_size=1, max_size=20)),
        "choices": [{"index": i, **c} for i, c in enumerate(choices)],
        "usage": draw(_usage),
    }
    if draw(st.booleans()):
        completion["system_fingerprint"] = draw(st.text(min_size=1, max_size=8))
    return completion


@settings(max_examples=200, deadline=None)
@given(completion=completions(), chunk_chars=st.integers(1, 40), include_usage=st.booleans())
def test_round_trip_property(
    completion: dict[str, Any], chunk_chars: int, include_usage: bool
) -> None:
    events = chunks_from_completion(
        completion, include_usage=include_usage, chunk_chars=chunk_chars
    )
    assert events[-1] == DONE
    rebuilt = completion_from_chunks(parse_events(b"".join(events)))
    expected = completion if include_usage else {**completion, "usage": None}
    assert rebuilt == expected


# -- the official SDK consumes the synthesized stream ----------------------------


class Upstream:
    """A tiny HTTP server replaying prepared SSE events to whatever is asked."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.requests: list[dict[str, Any]] = []
        self.base_url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in self.events:
            await response.write(event)
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    app.router.add_post("/v1/completions", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


SDK_CASES = [
    chat(answer(LONG)),
    chat(answer(None, "tool_calls", tool_calls=TOOL_CALLS), answer("Also: no tools.", "length")),
]


@pytest.mark.parametrize("completion", SDK_CASES, ids=["content", "tool-calls-n2"])
async def test_the_sync_sdk_iterates_the_stream_and_it_adds_up(
    upstream: Upstream, completion: dict[str, Any]
) -> None:
    upstream.events = chunks_from_completion(completion, include_usage=True, chunk_chars=7)

    def consume() -> list[dict[str, Any]]:
        with openai.OpenAI(base_url=upstream.base_url, api_key="sk-x", max_retries=0) as client:
            stream = client.chat.completions.create(
                model="llama-8b",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk.to_dict() for chunk in stream]

    chunks = await asyncio.to_thread(consume)
    assert chunks[-1]["usage"] == USAGE
    assert completion_from_chunks(chunks) == completion


async def test_the_sdk_stream_helper_accumulates_the_same_completion(
    upstream: Upstream,
) -> None:
    # (The helper refuses a "length" finish: it would parse truncated content.)
    completion = chat(answer(None, "tool_calls", tool_calls=TOOL_CALLS), answer("No tools."))
    upstream.events = chunks_from_completion(completion, include_usage=True, chunk_chars=5)
    async with (
        openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-x", max_retries=0) as client,
        client.chat.completions.stream(
            model="llama-8b", messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        final = await stream.get_final_completion()
    assert final.id == completion["id"]
    assert final.usage is not None
    assert final.usage.total_tokens == USAGE["total_tokens"]
    for got, want in zip(final.choices, completion["choices"], strict=True):
        assert got.finish_reason == want["finish_reason"]
        assert got.message.content == want["message"]["content"]
        calls = [
            {"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                       "arguments": c.function.arguments}}
            for c in got.message.tool_calls or []
            if c.type == "function"
        ]  # fmt: skip
        assert calls == want["message"].get("tool_calls", [])


async def test_the_async_sdk_iterates_a_completions_stream(upstream: Upstream) -> None:
    completion = text_completion(LONG, "second choice")
    upstream.events = chunks_from_completion(completion, include_usage=False)
    async with openai.AsyncOpenAI(
        base_url=upstream.base_url, api_key="sk-x", max_retries=0
    ) as client:
        stream = await client.completions.create(model="llama-8b", prompt="hi", stream=True)
        chunks = [chunk.to_dict() async for chunk in stream]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert completion_from_chunks(chunks) == {**completion, "usage": None}


def test_tool_calls_are_ordered_by_index_whatever_order_they_arrive_in() -> None:
    def call(index: int, name: str) -> dict[str, Any]:
        return {"index": index, "id": f"c{index}", "type": "function",
                "function": {"name": name, "arguments": "{}"}}  # fmt: skip

    chunks = [
        vllm_chunk([delta(0, role="assistant", tool_calls=[call(1, "second")])]),
        vllm_chunk([delta(0, "tool_calls", tool_calls=[call(0, "first")])]),
    ]
    rebuilt = completion_from_chunks(chunks)
    assert rebuilt is not None
    names = [c["function"]["name"] for c in rebuilt["choices"][0]["message"]["tool_calls"]]
    assert names == ["first", "second"]
