"""The gateway's /metrics after real traffic: requests, cost, attempts and replica GPU time."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from tests.conftest import Stack, set_faults
from tests.support.metrics import scrape, value


def test_metrics_follow_requests(stack: Stack) -> None:
    before = scrape(stack.gateway.url)
    client = stack.client()
    costs = Decimal(0)
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": f"m{i}"}], max_tokens=6
        )
        costs += Decimal(raw.headers["x-tollway-cost-usd"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    after = scrape(stack.gateway.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"tier": "small", "tenant": "acme", "status": "200", "cache": "bypass"}  # sampled
    assert delta("tollway_requests_total", **ok) == 3
    assert delta("tollway_requests_total", tier="none", status="404") == 1
    assert delta("tollway_cost_marginal_usd_total", tier="small", tenant="acme") == pytest.approx(
        float(costs), abs=1e-9
    )
    assert delta("tollway_upstream_attempts_total", tier="small", outcome="ok") == 3
    assert delta("tollway_tokens_total", tier="small", kind="completion") > 0
    busy = value(after, "tollway_replica_gpu_seconds_total", replica=stack.small.url, state="busy")
    assert busy > 0
    assert delta("tollway_cache_requests_total", tier="small", result="bypass") == 3


def test_cache_lookups_are_counted(stack: Stack) -> None:
    before = scrape(stack.gateway.url)
    client = stack.client()
    for _ in range(2):  # temperature 0: looked up; a miss, then a hit
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": f"count me {id(before)}"}],
            max_tokens=4,
            temperature=0,
        )
    after = scrape(stack.gateway.url)
    counted = {
        result: value(after, "tollway_cache_requests_total", tier="small", result=result)
        - value(before, "tollway_cache_requests_total", tier="small", result=result)
        for result in ("hit", "miss", "bypass")
    }
    assert counted == {"hit": 1, "miss": 1, "bypass": 0}


def test_retries_show_as_attempts(stack: Stack) -> None:
    set_faults(stack.large[0], error_rate=1.0, error_status=503)
    before = scrape(stack.gateway.url)
    stack.client().completions.create(model="sim-large", prompt="x", max_tokens=2)
    after = scrape(stack.gateway.url)
    attempts = value(after, "tollway_upstream_attempts_total", tier="large") - value(
        before, "tollway_upstream_attempts_total", tier="large"
    )
    requests = value(after, "tollway_upstream_requests_total", tier="large") - value(
        before, "tollway_upstream_requests_total", tier="large"
    )
    assert (attempts, requests) == (2, 1)  # retry inflation 2.0 for this one request
    assert value(after, "tollway_upstream_attempts_total", outcome="status_503") >= 1
