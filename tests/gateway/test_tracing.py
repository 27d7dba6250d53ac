"""Spans leave a real gateway over OTLP/HTTP and join the client's and vLLM's trace.

A small OTLP/HTTP collector on 127.0.0.1 receives what the gateway's exporter
sends (configured only by the standard OTEL_* variables); the test decodes the
protobuf and checks the span tree, the GenAI attributes and the traceparent
that reached the simulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import FAST_SIM, KEY, gateway_config, http_json
from tests.support.otlp_collector import Collector, running_collector
from tests.support.procs import Proc, running, start_gateway, start_sim

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [v.string_value for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, kind)
    return out


@pytest.fixture
def traced(log_dir: Path) -> Iterator[tuple[Proc, Proc, Collector]]:
    with running_collector() as collector, ExitStack() as procs:  # stopped even if one fails
        sims = [
            procs.enter_context(running(start_sim(log_dir, [name], *FAST_SIM)))
            for name in ("sim-small", "sim-large")
        ]
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",  # every request (default 1%)
        }
        config = gateway_config([sims[0].url], [sims[1].url])
        config["tiers"][0]["fallback"] = ["large"]
        gateway = procs.enter_context(running(start_gateway(log_dir, config, env=env)))
        yield gateway, sims[0], collector


def test_request_span_tree_and_attributes(traced: tuple[Proc, Proc, Collector]) -> None:
    gateway, small, collector = traced
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "a secret prompt"}],
        max_tokens=8,
        temperature=0,
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    completion = raw.parse()
    span = collector.wait_for("chat auto")
    assert span.trace_id.hex() == CLIENT_TRACE  # joined the client's trace
    assert span.parent_span_id.hex() == CLIENT_SPAN

    attrs = attributes(span)
    headers = raw.headers
    assert completion.usage is not None
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "auto",
        "gen_ai.request.max_tokens": 8,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.response.model": "sim-small",
        "gen_ai.response.id": completion.id,
        "gen_ai.response.finish_reasons": [completion.choices[0].finish_reason],
        "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
        "gen_ai.usage.cost.amount": float(headers["x-tollway-cost-usd"]),
        "gen_ai.usage.cost.currency": "USD",
        "gen_ai.usage.cost.source": "local",
        "server.address": "127.0.0.1",
        "server.port": int(small.url.rsplit(":", 1)[1]),
        "tollway.request_id": headers["x-request-id"],
        "tollway.tenant": "acme",
        "tollway.tier": "small",
        "tollway.cache": "miss",
        "tollway.route.reason": "default tier for routed alias",
        "tollway.gpu_seconds": pytest.approx(float(headers["x-tollway-gpu-seconds"]), abs=1e-6),
        "tollway.cost.loaded_usd": float(headers["x-tollway-cost-loaded-usd"]),
        "tollway.attempts": 1,
        "tollway.replica": small.url,
    }
    assert "a secret prompt" not in str(collector.spans)  # content is opt-in

    by_parent = {s.name: s for s in collector.spans if s.parent_span_id == span.span_id}
    assert set(by_parent) == {"tollway.route", "tollway.cache_lookup", "POST"}
    assert attributes(by_parent["tollway.cache_lookup"]) == {"tollway.cache": "miss"}
    upstream = by_parent["POST"]
    assert attributes(upstream) == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": int(small.url.rsplit(":", 1)[1]),
        "url.full": small.url + "/v1/chat/completions",
        "http.response.status_code": 200,
    }
    sent = http_json("GET", small.url + "/sim/requests")[-1]["headers"]
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id.hex()}-01"


def test_an_unsampled_client_trace_is_not_recorded_but_reaches_vllm(
    traced: tuple[Proc, Proc, Collector],
) -> None:
    gateway, small, collector = traced
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0) as client:
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "not sampled"}],
            max_tokens=4,
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"},
        )
        sent = http_json("GET", small.url + "/sim/requests")[-1]["headers"]
        client.chat.completions.create(  # sampled (no traceparent): exported after the first
            model="sim-large", messages=[{"role": "user", "content": "sampled"}], max_tokens=4
        )
    collector.wait_for("chat sim-large")
    assert [s.name for s in collector.spans if s.trace_id.hex() == CLIENT_TRACE] == []
    version, trace_id, span_id, flags = sent["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "00")
    assert span_id != CLIENT_SPAN  # the gateway's own (unrecorded) span


def test_a_queued_request_has_a_queue_wait_span(traced: tuple[Proc, Proc, Collector]) -> None:
    """12 at once on a tier of 4 slots: those that wait for admission get a tollway.queue_wait."""
    gateway, _, collector = traced

    async def burst() -> None:
        async with openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key=KEY, max_retries=0
        ) as client:
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="sim-small",
                        messages=[{"role": "user", "content": f"queue {i}"}],
                        max_tokens=24,
                    )
                    for i in range(12)
                )
            )

    asyncio.run(burst())
    first = collector.wait_for("tollway.queue_wait")
    collector.wait_for("chat sim-small")
    time.sleep(0.5)  # the rest of the batch (exported every 50 ms)
    waits = [s for s in collector.spans if s.name == "tollway.queue_wait"]
    assert 1 <= len(waits) <= 8  # only requests that found all 4 slots taken waited
    roots = {s.span_id: s for s in collector.spans if s.name == "chat sim-small"}
    assert first.parent_span_id in roots  # a child of its request's span
    attrs = attributes(first)
    assert set(attrs) == {"tollway.queue.depth", "tollway.tier", "tollway.queue.wait_ms"}
    assert attrs["tollway.tier"] == "small"
    assert 1 <= attrs["tollway.queue.depth"] <= 8
    assert attrs["tollway.queue.wait_ms"] > 0
    assert (
        first.end_time_unix_nano - first.start_time_unix_nano
        >= attrs["tollway.queue.wait_ms"] * 1e6 * 0.9
    )


def test_a_fallback_is_on_the_span(traced: tuple[Proc, Proc, Collector]) -> None:
    gateway, small, collector = traced
    small.stop()  # the small tier has no replica left: its requests go to large
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": "fall back"}], max_tokens=4
        )
    assert raw.headers["x-tollway-fallback-from"] == "small"
    attrs = attributes(collector.wait_for("chat sim-small"))
    assert attrs["tollway.tier"] == "large"
    assert attrs["tollway.fallback.from"] == "small"
    assert attrs["tollway.fallback.reason"] == "unavailable"
    assert attrs["gen_ai.response.model"] == "sim-large"
