"""The usage ledger through the gateway: /v1/usage sums, tenant scoping, budgets, Redis outages."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import FAST_SIM, KEY, LEDGER_KEY, OTHER_KEY, Stack, gateway_config
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.redis_server import run_redis


def usage(gateway: Proc, key: str, **params: str) -> httpx.Response:
    return httpx.get(
        gateway.url + "/v1/usage", params=params, headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )  # fmt: skip


def total(gateway: Proc, key: str = KEY, **params: str) -> dict[str, Any]:
    response = usage(gateway, key, **params)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["total"]
    return result


def wait_for_requests(gateway: Proc, key: str, want: int, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        got = total(gateway, key)
        if got["requests"] >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_usage_totals_equal_the_sum_of_the_headers(stack: Stack) -> None:
    # Its own tenant: other tests' records, still queued in the ledger writer,
    # cannot land inside this test's window.
    before = total(stack.gateway, LEDGER_KEY)
    client = stack.client(LEDGER_KEY)
    cost = loaded = Decimal(0)
    tokens = 0
    for i in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model="sim-small" if i % 2 else "sim-large",
            messages=[{"role": "user", "content": f"usage {i}"}],
            max_tokens=8,
        )
        cost += Decimal(raw.headers["x-tollway-cost-usd"])
        loaded += Decimal(raw.headers["x-tollway-cost-loaded-usd"])
        tokens += int(raw.headers["x-tollway-completion-tokens"])
    stream = client.chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": "a stream"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    figures = (list(stream)[-1].model_extra or {})["tollway"]
    cost += Decimal(figures["cost_usd"])
    loaded += Decimal(figures["cost_loaded_usd"])
    tokens += figures["completion_tokens"]

    after = wait_for_requests(stack.gateway, LEDGER_KEY, before["requests"] + 5)
    assert after["requests"] - before["requests"] == 5
    assert Decimal(after["cost_usd"]) - Decimal(before["cost_usd"]) == cost  # exact, to the nano
    assert Decimal(after["cost_loaded_usd"]) - Decimal(before["cost_loaded_usd"]) == loaded
    assert after["completion_tokens"] - before["completion_tokens"] == tokens


def test_budget_exceeded_is_429_with_reset(procs: list[Proc], log_dir: Path) -> None:
    with run_redis() as redis_server:
        sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
        procs += sims
        config = gateway_config([sims[0].url], [sims[1].url], redis_server.url)
        config["budgets"] = {"acme": {"daily_usd": 0.00000001, "monthly_usd": 100}}
        gateway = start_gateway(log_dir, config)
        procs.append(gateway)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        first = client.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert first.headers["x-tollway-budget-remaining-usd"] == "0.000000000"
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": "again"}]
            )
        assert err.value.code == "budget_exceeded"
        assert "daily budget" in err.value.message
        assert "resets at" in err.value.message
        retry_after = int(err.value.response.headers["retry-after"])
        assert 0 < retry_after <= 86400
        # Another tenant is not affected, and has no budget header.
        other = openai.OpenAI(base_url=gateway.url + "/v1", api_key=OTHER_KEY, max_retries=0)
        ok = other.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert "x-tollway-budget-remaining-usd" not in ok.headers


def test_redis_outage_fails_open_and_recovers(procs: list[Proc], log_dir: Path) -> None:
    with run_redis() as redis_server:
        sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
        procs += sims
        config = gateway_config([sims[0].url], [sims[1].url], redis_server.url)
        config["cache"] = {"local_ttl_s": 0}  # every hit must come from Redis here
        gateway = start_gateway(log_dir, config)
        procs.append(gateway)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)

        def ask(i: int) -> None:
            client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": f"r{i}"}], max_tokens=4
            )

        ask(0)
        assert wait_for_requests(gateway, KEY, 1)["requests"] == 1

        redis_server.stop()
        for i in range(10):
            ask(i)  # every request still succeeds
        outage = [client.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": "cache down"}],
            max_tokens=4, temperature=0, extra_headers={"idempotency-key": f"k{i}"},
        ).headers["x-tollway-cache"] for i in range(3)]  # fmt: skip
        assert outage == ["miss"] * 3  # looked up, found nothing, stored nothing
        assert usage(gateway, KEY).status_code == 503
        metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
        assert "tollway_redis_failures_total" in metrics

        redis_server.start()  # same port, empty: the client reconnects by itself
        deadline = time.monotonic() + 15
        while True:
            ask(100)
            response = usage(gateway, KEY)
            if response.status_code == 200 and response.json()["total"]["requests"] >= 1:
                break
            assert time.monotonic() < deadline, "the ledger did not resume after Redis returned"
            time.sleep(0.3)
        assert json.loads(response.text)["total"]["requests"] >= 1
        # ...and so does the response cache, without restarting the gateway.
        cached = {"model": "sim-small", "max_tokens": 4, "temperature": 0,
                  "messages": [{"role": "user", "content": "after the outage"}]}  # fmt: skip
        statuses = [client.chat.completions.with_raw_response.create(**cached)
                    .headers["x-tollway-cache"] for _ in range(2)]  # fmt: skip
        assert statuses[0] == "miss"
        assert statuses[1] in ("hit", "coalesced")  # from Redis either way (local layer off)
