"""/metrics: vLLM's names, labels and Prometheus text format, and counters that add up."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from sim.metrics import REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from sim.server import SimServer

StartSim = Callable[..., Awaitable[SimServer]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Scrape = Callable[[SimServer], Awaitable[Samples]]
Labels = Callable[..., frozenset[tuple[str, str]]]

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT_BUCKETS,
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY_BUCKETS,
}
_LABELS = r'\{(?:[a-z_]+="[^"]*",)*[a-z_]+="[^"]*"\}'
_LINE = re.compile(rf"^(# (HELP|TYPE) \S+ .+|[a-z_:][a-z0-9_:]*{_LABELS} [-+0-9.eInf]+)$")


async def test_exposition_format_names_and_labels(
    start_sim: StartSim, http: aiohttp.ClientSession
) -> None:
    sim = await start_sim(served_model_names=["org/model-1b", "alias"])
    async with http.get(f"{sim.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    assert text.endswith("\n")
    for line in text.splitlines():
        assert _LINE.match(line), line
    types = dict(line.split(" ")[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    assert {name: types[name] for name in GAUGES} == dict.fromkeys(GAUGES, "gauge")
    assert {name: types[name] for name in COUNTERS} == dict.fromkeys(COUNTERS, "counter")
    assert {name: types[name] for name in HISTOGRAMS} == dict.fromkeys(HISTOGRAMS, "histogram")
    # Every sample names engine 0 and the first served model, nothing else.
    assert 'model_name="alias"' not in text
    for line in text.splitlines():
        if not line.startswith("#"):
            assert 'engine="0"' in line, line
            assert 'model_name="org/model-1b"' in line, line
    for reason in ("stop", "length", "abort"):
        assert f'finished_reason="{reason}"' in text
    for name, bounds in HISTOGRAMS.items():
        les = re.findall(rf'^{re.escape(name)}_bucket{{engine="0",le="([^"]+)"', text, re.M)
        assert les == [repr(b) for b in bounds] + ["+Inf"]


async def test_counters_and_histograms_follow_the_traffic(
    sim: SimServer,
    http: aiohttp.ClientSession,
    scrape: Scrape,
    engine_labels: Labels,
) -> None:
    before = await scrape(sim)
    usage = {"prompt": 0, "completion": 0}
    reasons = {"stop": 0, "length": 0}

    async def call(path: str, body: dict[str, Any]) -> None:
        async with http.post(f"{sim.base_url}/{path}", json=body) as resp:
            data = await resp.json()
        usage["prompt"] += data["usage"]["prompt_tokens"]
        usage["completion"] += data["usage"]["completion_tokens"]
        reasons[data["choices"][0]["finish_reason"]] += 1

    for i in range(3):
        await call("completions", {"model": "sim-model", "prompt": f"count {i}", "max_tokens": 4})
        await call(
            "chat/completions",
            {"model": "sim-model", "messages": [{"role": "user", "content": f"natural {i}"}]},
        )
    after = await scrape(sim)

    def delta(name: str, **extra: str) -> float:
        key = (name, engine_labels(**extra))
        return after[key] - before[key]

    assert reasons == {"stop": 3, "length": 3}
    assert delta("vllm:prompt_tokens_total") == usage["prompt"]
    assert delta("vllm:generation_tokens_total") == usage["completion"]
    assert delta("vllm:prefix_cache_queries_total") == usage["prompt"]
    assert delta("vllm:request_success_total", finished_reason="length") == 3
    assert delta("vllm:request_success_total", finished_reason="stop") == 3
    assert delta("vllm:request_success_total", finished_reason="abort") == 0
    for name in HISTOGRAMS:
        assert delta(f"{name}_count") == 6
        assert (
            after[(f"{name}_bucket", engine_labels(le="+Inf"))]
            == after[(f"{name}_count", engine_labels())]
        )
        counts = [after[(f"{name}_bucket", engine_labels(le=repr(b)))] for b in HISTOGRAMS[name]]
        assert counts == sorted(counts)  # cumulative
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    assert delta("vllm:request_decode_time_seconds_sum") > 0


async def test_reset_zeroes_metrics_and_stats(
    sim: SimServer,
    http: aiohttp.ClientSession,
    scrape: Scrape,
    engine_labels: Labels,
) -> None:
    body = {"model": "sim-model", "prompt": "x", "max_tokens": 2}
    async with http.post(f"{sim.base_url}/completions", json=body) as resp:
        assert resp.status == 200
    assert (await scrape(sim))[("vllm:generation_tokens_total", engine_labels())] == 2
    async with http.post(f"{sim.url}/sim/reset") as resp:
        stats = await resp.json()
    assert stats["requests_received_total"] == 0
    assert stats["requests_finished"] == 0
    samples = await scrape(sim)
    assert samples[("vllm:generation_tokens_total", engine_labels())] == 0
    assert samples[("vllm:e2e_request_latency_seconds_count", engine_labels())] == 0
