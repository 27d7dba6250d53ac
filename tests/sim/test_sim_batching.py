"""Continuous batching: slots, the waiting queue, the step-time model, KV pressure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from sim.server import SimServer

StartSim = Callable[..., Awaitable[SimServer]]
Stats = Callable[[SimServer], Awaitable[dict[str, Any]]]
Scrape = Callable[[SimServer], Awaitable[dict[tuple[str, frozenset[tuple[str, str]]], float]]]
WaitFor = Callable[..., Awaitable[None]]
Labels = Callable[..., frozenset[tuple[str, str]]]


async def _complete(
    http: aiohttp.ClientSession, sim: SimServer, max_tokens: int, prompt: str = "go"
) -> tuple[dict[str, Any], float]:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    start = time.monotonic()
    async with http.post(f"{sim.base_url}/completions", json=body) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
    return data, time.monotonic() - start


async def test_running_never_exceeds_max_num_seqs(
    start_sim: StartSim,
    http: aiohttp.ClientSession,
    stats: Stats,
    scrape: Scrape,
    wait_for: WaitFor,
    engine_labels: Labels,
) -> None:
    sim = await start_sim(max_num_seqs=4, decode_base_ms=10.0, decode_per_seq_ms=0.0)
    calls = [asyncio.ensure_future(_complete(http, sim, 15)) for _ in range(8)]

    async def full() -> bool:
        s = await stats(sim)
        return bool(s["running"] == 4 and s["waiting"] == 4)

    await wait_for(full, within=2.0)
    samples = await scrape(sim)
    assert samples[("vllm:num_requests_running", engine_labels())] == 4
    assert samples[("vllm:num_requests_waiting", engine_labels())] == 4
    assert samples[("vllm:kv_cache_usage_perc", engine_labels())] > 0

    results = await asyncio.gather(*calls)
    assert all(data["usage"]["completion_tokens"] == 15 for data, _ in results)
    s = await stats(sim)
    assert s["max_running_seen"] == 4
    assert s["max_waiting_seen"] == 4
    assert (s["running"], s["waiting"], s["requests_finished"]) == (0, 0, 8)
    # The second four waited about one whole generation (15 steps of 10 ms).
    samples = await scrape(sim)
    queue_sum = samples[("vllm:request_queue_time_seconds_sum", engine_labels())]
    assert queue_sum > 4 * 15 * 0.010 * 0.8
    assert samples[("vllm:kv_cache_usage_perc", engine_labels())] == 0


async def test_latency_follows_the_step_model(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    # A step costs 10 ms + 1 ms x batch. 20 tokens take 20 x 11 ms = 220 ms alone,
    # 20 x 18 ms = 360 ms in a batch of 8: each stream slower, the engine 4.9x faster.
    # (Wide margins: a busy machine slows the simulator's loop, never below the model.)
    sim = await start_sim(max_num_seqs=8, decode_base_ms=10.0, decode_per_seq_ms=1.0)
    _, alone = await _complete(http, sim, 20)
    batch = await asyncio.gather(*(_complete(http, sim, 20) for _ in range(8)))
    together = max(elapsed for _, elapsed in batch)
    assert 0.2 < alone < 0.35
    assert 0.33 < together < 0.6
    per_stream_alone = 20 / alone
    per_stream_batched = 20 / together
    total_batched = 8 * 20 / together
    assert per_stream_batched < per_stream_alone  # each stream slows down...
    assert total_batched > 2 * per_stream_alone  # ...while the engine does more (model: 4.9x)


async def test_prefill_cost_and_prefix_cache(
    start_sim: StartSim, http: aiohttp.ClientSession, scrape: Scrape, engine_labels: Labels
) -> None:
    # 4,000 prompt tokens at 20,000 tok/s: 200 ms of prefill in the first step.
    sim = await start_sim(prefill_tokens_per_s=20_000.0, decode_base_ms=1.0)
    prompt = "word " * 4000
    _, cold = await _complete(http, sim, 2, prompt)
    _, warm = await _complete(http, sim, 2, prompt)
    assert 0.19 < cold < 0.35
    assert warm < 0.05  # the whole prompt is cached
    samples = await scrape(sim)
    assert samples[("vllm:prefix_cache_queries_total", engine_labels())] == 8000
    # All 250 blocks hit the second time; one token is always computed, as in vLLM.
    assert samples[("vllm:prefix_cache_hits_total", engine_labels())] == 3999
    assert samples[("vllm:request_prefill_time_seconds_count", engine_labels())] == 2
    assert samples[("vllm:request_prefill_time_seconds_sum", engine_labels())] > 0.19


async def test_kv_pressure_preempts_and_everyone_still_finishes(
    start_sim: StartSim,
    http: aiohttp.ClientSession,
    stats: Stats,
    scrape: Scrape,
    engine_labels: Labels,
) -> None:
    # 16 blocks of 16 tokens; four sequences that each grow to ~7 blocks.
    sim = await start_sim(
        max_num_seqs=4, kv_cache_tokens=256, max_model_len=128, decode_base_ms=0.5
    )
    results = await asyncio.gather(*(_complete(http, sim, 90, f"p{i} " * 10) for i in range(4)))
    assert all(data["usage"]["completion_tokens"] == 90 for data, _ in results)
    s = await stats(sim)
    assert s["preemptions"] > 0
    assert s["max_waiting_seen"] > 0
    assert (s["running"], s["waiting"], s["requests_finished"]) == (0, 0, 4)
    samples = await scrape(sim)
    assert samples[("vllm:num_preemptions_total", engine_labels())] == s["preemptions"]
    assert samples[("vllm:generation_tokens_total", engine_labels())] == 360


async def test_zero_delay_mode_keeps_the_books(
    start_sim: StartSim,
    http: aiohttp.ClientSession,
    stats: Stats,
    scrape: Scrape,
    engine_labels: Labels,
) -> None:
    sim = await start_sim(
        prefill_tokens_per_s=float("inf"), decode_base_ms=0.0, decode_per_seq_ms=0.0
    )
    assert sim.config.zero_delay
    results = await asyncio.gather(*(_complete(http, sim, 10) for _ in range(20)))
    assert all(data["usage"]["completion_tokens"] == 10 for data, _ in results)
    s = await stats(sim)
    assert (s["requests_finished"], s["running"], s["waiting"]) == (20, 0, 0)
    samples = await scrape(sim)
    assert samples[("vllm:generation_tokens_total", engine_labels())] == 200
    length = engine_labels(finished_reason="length")
    assert samples[("vllm:request_success_total", length)] == 20
    assert samples[("vllm:e2e_request_latency_seconds_count", engine_labels())] == 20
