"""Retries, timeouts, dead replicas, mid-stream failures and client disconnects."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import FAST_SIM, KEY, SdkFactory, Stack, gateway_config, set_faults, sim_stats
from tests.support.metrics import OPS_HEADERS
from tests.support.procs import Proc, free_port, start_gateway, start_sim

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story."}]


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ready(gateway: Proc) -> httpx.Response:
    return httpx.get(gateway.url + "/ready", headers=OPS_HEADERS, timeout=5)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_503_is_retried_on_the_other_replica(stack: Stack) -> None:
    set_faults(stack.large[0], error_rate=1.0, error_status=503)
    client = stack.client()
    for i in range(6):
        completion = client.chat.completions.create(
            model="sim-large", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
        )
        assert completion.choices[0].message.content
    assert sim_stats(stack.large[1])["requests_finished"] == 6
    assert sim_stats(stack.large[0])["requests_failed"] >= 1


def test_stream_first_byte_timeout_is_retried(stack: Stack) -> None:
    set_faults(stack.large[0], hang_rate=1.0)
    started = time.monotonic()
    stream = stack.client().chat.completions.create(
        model="sim-large", messages=MESSAGES, max_tokens=5, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert 1.4 < time.monotonic() - started < 10  # first_byte_timeout_s is 1.5 in the stack
    assert sim_stats(stack.large[0])["requests_received_total"] == 1
    assert sim_stats(stack.large[1])["requests_finished"] == 1


def test_mid_stream_failure_ends_with_error_event_then_done(stack: Stack) -> None:
    set_faults(stack.small, die_mid_stream_rate=1.0, die_after_tokens=3)
    body = {"model": "sim-small", "messages": MESSAGES, "stream": True, "max_tokens": 20}
    headers = {"authorization": f"Bearer {KEY}"}
    url = stack.gateway.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = httpx.Response(200, content=events[-2]).json()["error"]
    assert error["code"] == "upstream_stream_error"
    assert "interrupted" in error["message"]
    assert len(events) >= 4  # the chunks sent before the failure were relayed
    stats = sim_stats(stack.small)
    assert stats["requests_received_total"] == 1  # never retried after bytes reached the client


def test_mid_stream_failure_surfaces_in_the_sdk(stack: Stack) -> None:
    set_faults(stack.small, die_mid_stream_rate=1.0, die_after_tokens=2)
    stream = stack.client().chat.completions.create(
        model="sim-small", messages=MESSAGES, max_tokens=20, stream=True
    )
    with pytest.raises(openai.APIError, match="interrupted"):
        for _ in stream:
            pass


def _slow_stack(procs: list[Proc], log_dir: Path, **upstream: Any) -> tuple[Proc, Proc]:
    slow = start_sim(
        log_dir, ["sim-small"], "--decode-base-ms", "40", "--output-tokens-min", "400",
        "--output-tokens-max", "500",
    )  # fmt: skip
    procs.append(slow)
    fast = start_sim(log_dir, ["sim-large"], *FAST_SIM)
    procs.append(fast)
    config = gateway_config([slow.url], [fast.url])
    config["upstream"].update(upstream)
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)
    return gateway, slow


def test_client_disconnect_mid_stream_cancels_upstream(procs: list[Proc], log_dir: Path) -> None:
    gateway, slow = _slow_stack(procs, log_dir)
    body = {"model": "sim-small", "messages": MESSAGES, "stream": True, "max_tokens": 500}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert sim_stats(slow)["running"] == 1
    wait_until(lambda: sim_stats(slow)["requests_aborted"] == 1, 5, "upstream abort")
    assert sim_stats(slow)["running"] == 0
    ready_body = ready(gateway).json()
    assert ready_body["tiers"]["small"]["replicas"][0]["in_flight"] == 0


def test_client_disconnect_before_answer_cancels_upstream(procs: list[Proc], log_dir: Path) -> None:
    gateway, slow = _slow_stack(procs, log_dir)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 500},
            headers={"authorization": f"Bearer {KEY}"},
            timeout=0.5,
        )
    wait_until(lambda: sim_stats(slow)["requests_aborted"] == 1, 5, "upstream abort")
    assert sim_stats(slow)["running"] == 0
    assert sim_stats(slow)["requests_finished"] == 0


def test_non_stream_total_timeout_is_504(procs: list[Proc], log_dir: Path) -> None:
    gateway, slow = _slow_stack(procs, log_dir, total_timeout_s=1.0)
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "sim-small", "messages": MESSAGES, "max_tokens": 500},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert sim_stats(slow)["requests_received_total"] == 1  # a spent budget is not retried
    wait_until(lambda: sim_stats(slow)["running"] == 0, 5, "upstream slot freed")


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_connect_error_moves_to_a_live_replica(
    procs: list[Proc], log_dir: Path, sdk: SdkFactory
) -> None:
    live = start_sim(log_dir, ["sim-large"], *FAST_SIM)
    procs.append(live)
    small = start_sim(log_dir, ["sim-small"], *FAST_SIM)
    procs.append(small)
    config = gateway_config([small.url], [_dead_url(), live.url])
    config["health"]["interval_s"] = 60  # passive detection only
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)
    client = sdk(gateway, KEY)
    for _ in range(3):
        assert client.completions.create(model="sim-large", prompt="hi", max_tokens=3).choices
    assert sim_stats(live)["requests_finished"] == 3
    replicas = ready(gateway).json()["tiers"]["large"]["replicas"]
    assert [r["healthy"] for r in replicas] == [False, True]


def test_no_healthy_upstream_is_503_naming_the_tier(
    procs: list[Proc], log_dir: Path, sdk: SdkFactory
) -> None:
    small = start_sim(log_dir, ["sim-small"], *FAST_SIM)
    procs.append(small)
    gateway = start_gateway(log_dir, gateway_config([small.url], [_dead_url()]))
    procs.append(gateway)
    client = sdk(gateway, KEY)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="sim-large", messages=MESSAGES)
    assert err.value.status_code == 503
    assert "tier 'large'" in err.value.message
    assert err.value.response.headers["retry-after"] == "1"
    response = ready(gateway)
    assert response.status_code == 503
    assert response.json()["tiers"]["large"]["healthy_replicas"] == 0
    assert client.chat.completions.create(model="sim-small", messages=MESSAGES).choices


def test_replica_killed_and_restarted(procs: list[Proc], log_dir: Path, sdk: SdkFactory) -> None:
    small = start_sim(log_dir, ["sim-small"], *FAST_SIM)
    procs.append(small)
    large = start_sim(log_dir, ["sim-large"], *FAST_SIM)
    procs.append(large)
    gateway = start_gateway(log_dir, gateway_config([small.url], [large.url]))
    procs.append(gateway)
    assert ready(gateway).status_code == 200

    large.stop()
    wait_until(lambda: ready(gateway).status_code == 503, 5, "/ready to notice the dead replica")
    port = int(large.url.rsplit(":", 1)[1])
    restarted = start_sim(log_dir, ["sim-large"], *FAST_SIM, port=port)
    procs.append(restarted)
    wait_until(lambda: ready(gateway).status_code == 200, 5, "/ready to re-admit the replica")
    client = sdk(gateway, KEY)
    assert client.chat.completions.create(model="sim-large", messages=MESSAGES).choices


def test_health_and_ready(stack: Stack) -> None:
    assert httpx.get(stack.gateway.url + "/health", timeout=5).json() == {"status": "ok"}
    body = ready(stack.gateway).json()
    assert body["status"] == "ready"
    assert {t: v["healthy_replicas"] for t, v in body["tiers"].items()} == {"small": 1, "large": 2}
    # vLLM's own load, scraped from each replica's /metrics
    small = body["tiers"]["small"]["replicas"][0]
    assert small["vllm"] == {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}


def test_unhealthy_flag_on_replica_takes_it_out(stack: Stack) -> None:
    set_faults(stack.large[0], unhealthy=True)
    wait_until(
        lambda: ready(stack.gateway).json()["tiers"]["large"]["healthy_replicas"] == 1,
        5,
        "replica marked unhealthy",
    )
    client = stack.client()
    for _ in range(4):
        client.completions.create(model="sim-large", prompt="x", max_tokens=2)
    assert sim_stats(stack.large[0])["requests_received_total"] == 0
    set_faults(stack.large[0], unhealthy=False)
    wait_until(
        lambda: ready(stack.gateway).json()["tiers"]["large"]["healthy_replicas"] == 2,
        5,
        "replica re-admitted",
    )
