"""The response cache through the gateway: hits, streams, policy, Cache-Control, isolation."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import KEY, OTHER_KEY, Stack, sim_stats


def unique_messages() -> list[Any]:
    return [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}]


def upstream_calls(stack: Stack) -> int:
    return sum(sim_stats(s)["requests_received_total"] for s in stack.sims)


def ask(stack: Stack, messages: list[Any], key: str = KEY, **kwargs: Any) -> Any:
    params: dict[str, Any] = {"model": "sim-small", "messages": messages, "max_tokens": 12,
                              "temperature": 0, **kwargs}  # fmt: skip
    return stack.client(key).chat.completions.with_raw_response.create(**params)


def test_deterministic_request_hits_the_second_time(stack: Stack) -> None:
    messages = unique_messages()
    first = ask(stack, messages)
    assert first.headers["x-tollway-cache"] == "miss"
    second = ask(stack, messages)
    assert second.headers["x-tollway-cache"] == "hit"
    assert int(second.headers["age"]) >= 0
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert Decimal(second.headers["x-tollway-cost-usd"]) == 0
    assert second.headers["x-tollway-cost-saved-usd"] == first.headers["x-tollway-cost-usd"]
    assert second.headers["x-tollway-gpu-seconds"] == "0.000000"
    assert upstream_calls(stack) == 1


def test_a_stream_hits_an_entry_stored_by_a_plain_request_and_back(stack: Stack) -> None:
    messages = unique_messages()
    plain = ask(stack, messages).parse()
    stream = stack.client().chat.completions.create(
        model="sim-small", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    tollway = (chunks[-1].model_extra or {})["tollway"]
    assert (tollway["cache"], tollway["cost_usd"]) == ("hit", "0.000000000")
    assert upstream_calls(stack) == 1

    # A streamed miss is stored once complete, and serves a plain request.
    other = unique_messages()
    streamed = stack.client().chat.completions.create(
        model="sim-small", messages=other, max_tokens=12, temperature=0, stream=True
    )
    streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    deadline = time.monotonic() + 5
    while (hit := ask(stack, other)).headers["x-tollway-cache"] != "hit":
        assert time.monotonic() < deadline, "the streamed answer was never stored"
        time.sleep(0.05)
    assert hit.parse().choices[0].message.content == streamed_text


def test_sampled_requests_bypass_the_cache(stack: Stack) -> None:
    messages = unique_messages()
    for _ in range(2):
        raw = ask(stack, messages, temperature=0.8)
        assert raw.headers["x-tollway-cache"] == "bypass"
    assert upstream_calls(stack) == 2
    seeded = [ask(stack, messages, temperature=0.8, seed=7) for _ in range(2)]
    assert [r.headers["x-tollway-cache"] for r in seeded] == ["miss", "hit"]


def test_cache_control_directives(stack: Stack) -> None:
    messages = unique_messages()
    no_store = ask(stack, messages, extra_headers={"cache-control": "no-store"})
    assert no_store.headers["x-tollway-cache"] == "bypass"
    again = ask(stack, messages)
    assert again.headers["x-tollway-cache"] == "miss"  # no-store stored nothing
    no_cache = ask(stack, messages, extra_headers={"cache-control": "no-cache"})
    assert no_cache.headers["x-tollway-cache"] == "bypass"  # skipped the lookup...
    assert upstream_calls(stack) == 3
    time.sleep(1.1)
    fresh_only = ask(stack, messages, extra_headers={"cache-control": "max-age=0"})
    assert fresh_only.headers["x-tollway-cache"] == "miss"  # ...and the entry is too old
    assert ask(stack, messages).headers["x-tollway-cache"] == "hit"


def test_bad_cache_ttl_header_is_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(stack, unique_messages(), extra_headers={"x-tollway-cache-ttl": "soon"})
    assert err.value.param == "x-tollway-cache-ttl"


def test_tenants_never_share_entries(stack: Stack) -> None:
    messages = unique_messages()
    ask(stack, messages, key=KEY)
    other = ask(stack, messages, key=OTHER_KEY)
    assert other.headers["x-tollway-cache"] == "miss"
    assert upstream_calls(stack) == 2


def test_completions_endpoint_is_cached_too(stack: Stack) -> None:
    prompt = f"Once upon a time {uuid.uuid4().hex}"
    url = stack.gateway.url + "/v1/completions"
    body = {"model": "sim-large", "prompt": prompt, "max_tokens": 6, "temperature": 0}
    headers = {"authorization": f"Bearer {KEY}"}
    first = httpx.post(url, json=body, headers=headers, timeout=10)
    second = httpx.post(url, json=body, headers=headers, timeout=10)
    assert [first.headers["x-tollway-cache"], second.headers["x-tollway-cache"]] == ["miss", "hit"]
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
