"""The OpenAI surface of the simulator, seen through the official SDK and raw HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from sim.server import SimServer
from sim.textgen import count_tokens

HELLO = [{"role": "user", "content": "Hello, world!"}]
# "Hello, world!" is 6 tokens (Hell|o|,| worl|d|!); + 4 template tokens per
# message + 3 for the generation prompt.
HELLO_PROMPT_TOKENS = 13

ClientFactory = Callable[..., openai.AsyncOpenAI]
StartSim = Callable[..., Awaitable[SimServer]]


async def test_chat_completion_shape(sim: SimServer, openai_client: ClientFactory) -> None:
    client = openai_client(sim)
    resp = await client.chat.completions.create(model="sim-model", messages=HELLO)  # type: ignore[arg-type]
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "sim-model"
    assert isinstance(resp.created, int)
    assert resp.created > 0
    [choice] = resp.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == HELLO_PROMPT_TOKENS
    assert resp.usage.completion_tokens == count_tokens(choice.message.content)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert 16 <= resp.usage.completion_tokens <= 128  # the default natural-length range


async def test_raw_chat_json_has_vllm_fields(sim: SimServer, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "messages": HELLO, "max_tokens": 5}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert set(data) >= {"id", "object", "created", "model", "choices", "usage"}
    choice = data["choices"][0]
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    assert choice["stop_reason"] is None
    assert choice["message"]["tool_calls"] == []
    assert data["usage"] == {
        "prompt_tokens": HELLO_PROMPT_TOKENS,
        "total_tokens": HELLO_PROMPT_TOKENS + 5,
        "completion_tokens": 5,
        "prompt_tokens_details": None,
    }


async def test_text_completion_with_the_sync_sdk(sim: SimServer) -> None:
    def call() -> Any:
        with openai.OpenAI(base_url=sim.base_url, api_key="sk-sim", max_retries=0) as client:
            return client.completions.create(model="sim-model", prompt="Say hi", max_tokens=7)

    # The sync client blocks, and the server shares this event loop: run it in a thread.
    resp = await asyncio.to_thread(call)
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    assert resp.model == "sim-model"
    [choice] = resp.choices
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    assert count_tokens(choice.text) == 7
    assert resp.usage.prompt_tokens == count_tokens("Say hi") == 2
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == 9


async def test_models_lists_every_alias_and_answers_to_each(
    start_sim: StartSim, openai_client: ClientFactory
) -> None:
    sim = await start_sim(served_model_names=["small", "llama-1b", "default"], max_model_len=2048)
    client = openai_client(sim)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["small", "llama-1b", "default"]
    assert all(m.object == "model" and m.owned_by == "vllm" for m in models.data)
    assert models.data[1].model_extra is not None
    assert models.data[1].model_extra["max_model_len"] == 2048
    resp = await client.chat.completions.create(model="llama-1b", messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
    # Like vLLM, responses name the first served model whatever alias was asked for.
    assert resp.model == "small"
    assert resp.choices[0].message.content


async def test_unknown_model_is_a_404_in_vllm_shape(
    sim: SimServer, http: aiohttp.ClientSession, openai_client: ClientFactory
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await openai_client(sim).chat.completions.create(model="gpt-9", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.status_code == 404
    body = {"model": "gpt-9", "prompt": "x"}
    async with http.post(f"{sim.base_url}/completions", json=body) as resp:
        assert resp.status == 404
        assert await resp.json() == {
            "error": {
                "message": "The model `gpt-9` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }


async def test_context_window_is_enforced_like_vllm(
    start_sim: StartSim, http: aiohttp.ClientSession, openai_client: ClientFactory
) -> None:
    sim = await start_sim(max_model_len=64, kv_cache_tokens=1024)
    with pytest.raises(openai.BadRequestError):
        await openai_client(sim).chat.completions.create(
            model="sim-model",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=60,
        )
    body = {"model": "sim-model", "messages": HELLO, "max_tokens": 60}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["param"] == "max_tokens"
    assert "maximum context length is 64 tokens" in error["message"]
    assert f"({60} > 64 - {HELLO_PROMPT_TOKENS})" in error["message"]

    long_prompt = {"model": "sim-model", "prompt": "word " * 64}
    async with http.post(f"{sim.base_url}/completions", json=long_prompt) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "input_tokens"

    # Without max_tokens the answer stops at the window, with finish_reason "length".
    fits = {"model": "sim-model", "prompt": "word " * 60, "ignore_eos": True}
    async with http.post(f"{sim.base_url}/completions", json=fits) as resp:
        data = await resp.json()
    assert data["usage"]["total_tokens"] == 64
    assert data["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "sim-model"}', "messages"),
        (b'{"model": "sim-model", "messages": []}', "messages"),
        (b'{"model": "sim-model", "messages": [{"content": "no role"}]}', "messages"),
        (b'{"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
        (
            b'{"model": "sim-model", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": -1}',
            "temperature",
        ),
        (
            b'{"model": "sim-model", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": 0}',
            "max_tokens",
        ),
        (
            b'{"model": "sim-model", "messages": [{"role": "user", "content": "x"}], '
            b'"stream_options": {"include_usage": true}}',
            "stream",
        ),
    ],
)
async def test_invalid_requests_are_400_in_vllm_shape(
    sim: SimServer, http: aiohttp.ClientSession, body: bytes, param: str | None
) -> None:
    async with http.post(f"{sim.base_url}/chat/completions", data=body) as resp:
        assert resp.status == 400
        payload = await resp.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["param"] == param
    assert error["message"]


async def test_unknown_fields_are_ignored(sim: SimServer, http: aiohttp.ClientSession) -> None:
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi", "name": "bob", "x-extra": 1}],
        "max_tokens": 4,
        "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": False},
        "some_future_field": {"a": [1, 2]},
    }
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 4


async def test_output_is_deterministic(sim: SimServer, openai_client: ClientFactory) -> None:
    client = openai_client(sim)

    async def ask(content: str, **kwargs: Any) -> tuple[str, str, int]:
        resp = await client.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": content}],
            **kwargs,
        )
        assert resp.usage is not None
        choice = resp.choices[0]
        return choice.message.content or "", choice.finish_reason, resp.usage.completion_tokens

    first = await ask("What is a toll road?")
    assert await ask("What is a toll road?") == first
    assert (await ask("What is a ferry?"))[0] != first[0]
    assert (await ask("What is a toll road?", temperature=0.7))[0] != first[0]
    assert (await ask("What is a toll road?", seed=7))[0] != first[0]

    # A lower max_tokens cuts the same answer short, as truncation would.
    text, reason, tokens = await ask("What is a toll road?", max_tokens=5)
    assert (reason, tokens) == ("length", 5)
    assert first[0].startswith(text)
    # A limit above the natural length changes nothing.
    assert await ask("What is a toll road?", max_tokens=1000) == first


async def test_output_length_range_and_ignore_eos(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    sim = await start_sim(output_tokens_min=3, output_tokens_max=6)
    lengths = set()
    for i in range(30):
        body = {"model": "sim-model", "prompt": f"prompt number {i}"}
        async with http.post(f"{sim.base_url}/completions", json=body) as resp:
            data = await resp.json()
        assert data["choices"][0]["finish_reason"] == "stop"
        lengths.add(data["usage"]["completion_tokens"])
    assert lengths <= {3, 4, 5, 6}
    assert len(lengths) > 1
    eos_ignored: dict[str, Any] = {
        "model": "sim-model",
        "prompt": "x",
        "max_tokens": 40,
        "ignore_eos": True,
    }
    async with http.post(f"{sim.base_url}/completions", json=eos_ignored) as resp:
        data = await resp.json()
    assert data["usage"]["completion_tokens"] == 40
    assert data["choices"][0]["finish_reason"] == "length"


async def test_n_and_prompt_batches_give_several_choices(
    sim: SimServer, openai_client: ClientFactory
) -> None:
    client = openai_client(sim)
    chat = await client.chat.completions.create(
        model="sim-model",
        messages=HELLO,  # type: ignore[arg-type]
        n=3,
        max_tokens=8,
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 3
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == HELLO_PROMPT_TOKENS  # counted once, as in vLLM
    assert chat.usage.completion_tokens == 24

    batch = await client.completions.create(
        model="sim-model", prompt=["one two", "red blue gold"], max_tokens=4
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == 2 + 3
    assert batch.usage.completion_tokens == 8

    ids = await client.completions.create(
        model="sim-model", prompt=[[11, 12, 13, 14, 15], [16, 17]], max_tokens=2, n=2
    )
    assert [c.index for c in ids.choices] == [0, 1, 2, 3]
    assert ids.usage is not None
    assert ids.usage.prompt_tokens == 5 + 2
    assert ids.usage.completion_tokens == 8


async def test_health_and_version(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    async with http.get(f"{sim.url}/version") as resp:
        assert resp.status == 200
        assert (await resp.json())["version"].startswith("0.")
