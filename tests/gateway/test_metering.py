"""Per-request metering through the gateway: headers, the stream's tollway object, conservation."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai

from tests.conftest import (
    FAST_SIM,
    KEY,
    Stack,
    detailed_ready,
    gateway_config,
    sim_stats,
)
from tests.support.metrics import metrics_text
from tests.support.procs import start_gateway, start_sim
from tests.support.redis_server import RedisServer

MESSAGES: list[Any] = [{"role": "user", "content": "Summarise the plot of Hamlet."}]
COST_HEADERS = {
    "x-tollway-request-id", "x-tollway-tier", "x-tollway-model", "x-tollway-prompt-tokens",
    "x-tollway-completion-tokens", "x-tollway-gpu-seconds", "x-tollway-cost-usd",
    "x-tollway-cost-loaded-usd",
}  # fmt: skip
SMALL_USD_PER_GPU_HOUR = Decimal("1.0")  # tests/conftest.py gateway_config


def replica_occupancy(stack: Stack, tier: str, index: int = 0) -> dict[str, float]:
    ready = detailed_ready(stack.gateway)
    occupancy: dict[str, float] = ready["tiers"][tier]["replicas"][index]["occupancy"]
    return occupancy


def test_non_streaming_headers_are_consistent(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="sim-small", messages=MESSAGES, max_tokens=16
    )
    completion = raw.parse()
    headers = raw.headers
    assert set(headers) >= COST_HEADERS
    assert headers["x-tollway-request-id"] == headers["x-request-id"]
    assert completion.usage is not None
    assert int(headers["x-tollway-prompt-tokens"]) == completion.usage.prompt_tokens
    assert int(headers["x-tollway-completion-tokens"]) == completion.usage.completion_tokens
    gpu_seconds = Decimal(headers["x-tollway-gpu-seconds"])
    assert gpu_seconds > 0
    marginal = Decimal(headers["x-tollway-cost-usd"])
    expected = gpu_seconds * SMALL_USD_PER_GPU_HOUR / 3600
    assert abs(marginal - expected) <= Decimal("1e-9")  # header gpu-seconds are rounded to 1e-6
    loaded = Decimal(headers["x-tollway-cost-loaded-usd"])
    assert loaded >= marginal * Decimal("1.25") - Decimal("1e-9")


def _stream_events(stack: Stack, **body: Any) -> list[dict[str, Any]]:
    payload = {"model": "sim-small", "messages": MESSAGES, "max_tokens": 12, "stream": True, **body}
    events = []
    with httpx.stream(
        "POST", stack.gateway.url + "/v1/chat/completions", json=payload,
        headers={"authorization": f"Bearer {KEY}"}, timeout=30,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream_without_usage_request_gets_tollway_on_the_finish_chunk(stack: Stack) -> None:
    chunks = _stream_events(stack)
    assert all("usage" not in c for c in chunks)  # OpenAI semantics: not asked, not sent
    assert all(c["choices"] for c in chunks)  # no usage-only chunk either
    assert [("tollway" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    tollway = last["tollway"]
    assert tollway["tier"] == "small"
    assert tollway["completion_tokens"] == sim_stats(stack.small)["completion_tokens"]
    assert Decimal(tollway["cost_usd"]) > 0


def test_stream_with_usage_gets_tollway_beside_usage(stack: Stack) -> None:
    chunks = _stream_events(stack, stream_options={"include_usage": True})
    final = chunks[-1]
    assert final["choices"] == []
    assert final["usage"]["completion_tokens"] == final["tollway"]["completion_tokens"]
    assert final["usage"]["prompt_tokens"] == final["tollway"]["prompt_tokens"]
    assert all("usage" not in c for c in chunks[:-1])
    assert sum(1 for c in chunks if "tollway" in c) == 1


def test_stream_with_continuous_usage_keeps_per_chunk_usage(stack: Stack) -> None:
    chunks = _stream_events(
        stack, stream_options={"include_usage": True, "continuous_usage_stats": True}
    )
    per_chunk = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert per_chunk == sorted(per_chunk)
    assert per_chunk[-1] == chunks[-1]["usage"]["completion_tokens"]


def test_sdk_stream_exposes_tollway_object(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model="sim-small", messages=MESSAGES, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    extra = chunks[-1].model_extra or {}
    assert chunks[-1].usage is not None
    assert extra["tollway"]["completion_tokens"] == chunks[-1].usage.completion_tokens


def test_aborted_stream_is_billed_for_what_was_generated(stack: Stack) -> None:
    before = replica_occupancy(stack, "small")
    payload = {"model": "sim-small", "messages": MESSAGES, "max_tokens": 24, "stream": True}
    with httpx.stream(
        "POST", stack.gateway.url + "/v1/chat/completions", json=payload,
        headers={"authorization": f"Bearer {KEY}"}, timeout=30,
    ) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.monotonic() + 5
    while replica_occupancy(stack, "small")["attributed_gpu_s"] == before["attributed_gpu_s"]:
        assert time.monotonic() < deadline, "the aborted stream was never metered"
        time.sleep(0.05)


async def test_gpu_seconds_are_conserved_end_to_end(stack: Stack) -> None:
    """16 concurrent requests on one replica: the headers add up to its busy GPU time."""
    before = replica_occupancy(stack, "small")
    started = time.monotonic()
    async with stack.async_client() as client:
        raws = await asyncio.gather(
            *(
                client.chat.completions.with_raw_response.create(
                    model="sim-small",
                    messages=[{"role": "user", "content": f"request {i}"}],
                    max_tokens=20,
                )
                for i in range(16)
            )
        )
    elapsed = time.monotonic() - started
    after = replica_occupancy(stack, "small")
    header_sum = sum(float(r.headers["x-tollway-gpu-seconds"]) for r in raws)
    attributed = after["attributed_gpu_s"] - before["attributed_gpu_s"]
    assert abs(header_sum - attributed) <= 16 * 5e-7  # headers carry 6 decimals
    assert after["accrued_gpu_s"] == 0  # nothing in flight any more
    assert sim_stats(stack.small)["max_running_seen"] >= 2  # they really shared the batch
    wall = after["wall_s"] - before["wall_s"]
    gpu_time = sum(
        after[k] - before[k] for k in ("attributed_gpu_s", "foreign_gpu_s", "idle_gpu_s")
    )
    assert abs(gpu_time - wall * after["gpus"]) <= 1e-9 * max(1.0, wall)
    assert elapsed <= wall <= elapsed + 1.0  # the ledger clock is the real clock
    # Shared time is split, not double-counted: the sum can't exceed the replica's busy time.
    assert header_sum <= wall * after["gpus"] + 1e-6


def test_metering_can_be_switched_off(log_dir: Path) -> None:
    sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
    config = gateway_config([sims[0].url], [sims[1].url])
    config["metering"] = {"enabled": False}
    gateway = start_gateway(log_dir, config)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="sim-small", messages=MESSAGES, max_tokens=4
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-tollway-tier"] == "small"
        assert not COST_HEADERS - {"x-tollway-tier", "x-tollway-model"} & set(raw.headers)
        metrics = metrics_text(gateway.url)
        assert "tollway_requests_total{" not in metrics
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()


def test_with_metering_off_answers_are_still_cached_and_carry_no_figures(
    log_dir: Path, stack_redis: RedisServer
) -> None:
    # The response cache and idempotency do not depend on metering: switched off,
    # a deterministic answer is stored and served again, without cost figures.
    sim = start_sim(log_dir, ["sim-small"], *FAST_SIM)
    large = start_sim(log_dir, ["sim-large"], *FAST_SIM)
    config = gateway_config([sim.url], [large.url], redis_url=stack_redis.url)
    config["metering"] = {"enabled": False}
    gateway = start_gateway(log_dir, config)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "user", "content": f"metering off {time.time_ns()}"}]
        answers = [
            client.chat.completions.with_raw_response.create(
                model="sim-small", messages=messages, max_tokens=8, temperature=0
            )
            for _ in range(2)
        ]
        assert [a.headers["x-tollway-cache"] for a in answers] == ["miss", "hit"]
        contents = [a.parse().choices[0].message.content for a in answers]
        assert contents[0]
        assert contents[0] == contents[1]
        assert sim_stats(sim)["requests_received_total"] == 1
        figures = COST_HEADERS - {"x-tollway-tier", "x-tollway-model"}
        for answer in answers:
            assert not figures & set(answer.headers), answer.headers
            assert "x-tollway-cost-saved-usd" not in answer.headers
        # Streams, served by the replica or from the cache: no ``tollway`` object either.
        fresh = [{"role": "user", "content": f"metering off, streamed {time.time_ns()}"}]
        for asked, served in ((fresh, "miss"), (messages, "hit")):
            with client.chat.completions.with_streaming_response.create(
                model="sim-small", messages=asked, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True},
            ) as raw:  # fmt: skip
                assert raw.headers["x-tollway-cache"] == served
                chunks = list(raw.parse())
            assert chunks[-1].usage is not None
            assert all("tollway" not in (c.model_extra or {}) for c in chunks)
        assert sim_stats(sim)["requests_received_total"] == 2
    finally:
        gateway.stop()
        sim.stop()
        large.stop()


def test_an_answer_naming_the_replicas_canonical_model_is_renamed_and_metered(
    log_dir: Path,
) -> None:
    # vLLM answers with its first --served-model-name whatever name was asked for.
    # The gateway reads only the usage of an answer it relays unread; one that
    # names another model is parsed, renamed and metered all the same.
    small = start_sim(log_dir, ["sim-canonical", "sim-small"], *FAST_SIM)
    large = start_sim(log_dir, ["sim-large"], *FAST_SIM)
    gateway = start_gateway(log_dir, gateway_config([small.url], [large.url]))
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        for model, sim in (("sim-small", small), ("sim-large", large)):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, max_tokens=8
            )
            completion = raw.parse()
            assert completion.model == model
            assert completion.usage is not None
            assert int(raw.headers["x-tollway-prompt-tokens"]) == completion.usage.prompt_tokens
            done = completion.usage.completion_tokens
            assert int(raw.headers["x-tollway-completion-tokens"]) == done > 0
            assert Decimal(raw.headers["x-tollway-cost-usd"]) > 0
            assert sim_stats(sim)["completion_tokens"] == done  # its first request
    finally:
        gateway.stop()
        small.stop()
        large.stop()
