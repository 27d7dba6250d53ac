"""The ledger through the gateway: usage sums equal the headers, budgets, Redis outages."""

from __future__ import annotations

import itertools
import subprocess
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import redis
import yaml

from tests.conftest import FAST_SIM, KEY, LEDGER_KEY, OTHER_KEY, Stack, gateway_config, with_ledger
from tests.support.metrics import metrics_text
from tests.support.postgres_server import PostgresServer
from tests.support.procs import BIN, Proc, start_gateway, start_sim
from tests.support.redis_server import run_redis

TINY_HOLDS = {"unobserved_usd_per_mtok": 0.0001}  # a first request's hold: a few nano-dollars


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
        # A hold of a few nano-dollars fits the $0.00000001 budget, the request's cost
        # does not: the first is served, the next refused (its estimate has learned).
        config["reservations"] = TINY_HOLDS
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
    """Redis down: every request is still served (cache and idempotency skipped); Redis
    back: the cache works again without a restart. (The ledger is PostgreSQL's: its rows
    through a Redis outage are tests/gateway/test_ledger_faults.py's.)"""
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
        redis_server.stop()
        for i in range(10):
            ask(i)  # every request still succeeds
        outage = [client.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": "cache down"}],
            max_tokens=4, temperature=0, extra_headers={"idempotency-key": f"k{i}"},
        ).headers["x-tollway-cache"] for i in range(3)]  # fmt: skip
        assert outage == ["miss"] * 3  # looked up, found nothing, stored nothing
        metrics = metrics_text(gateway.url)
        assert "tollway_redis_failures_total" in metrics

        redis_server.start()  # same port, empty: the client reconnects by itself
        deadline = time.monotonic() + 15
        for attempt in itertools.count():
            content = f"after the outage {attempt}"
            cached = {"model": "sim-small", "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": content}]}  # fmt: skip
            statuses = [client.chat.completions.with_raw_response.create(**cached)
                        .headers["x-tollway-cache"] for _ in range(2)]  # fmt: skip
            if statuses[1] in ("hit", "coalesced"):  # from Redis either way (local layer off)
                break
            assert time.monotonic() < deadline, "the cache did not resume after Redis returned"
            time.sleep(0.3)
        assert statuses[0] == "miss"


def test_budgets_survive_losing_redis(
    procs: list[Proc], log_dir: Path, postgres: PostgresServer, tmp_path: Path
) -> None:
    """Redis's spend counters are rebuilt from the ledger: a Redis that lost everything
    (restarted empty) does not give a spent budget its money back, with ``tollway db
    rebuild-counters``, at the next gateway start, or while the gateway runs."""
    with run_redis() as redis_server:
        sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
        procs += sims
        config = gateway_config([sims[0].url], [sims[1].url], redis_server.url)
        config = with_ledger(config, postgres, tmp_path / "spool")
        # Its own tenant: the shared ledger holds other tests' spend, which the start's
        # rebuild of the counters would count against this budget.
        tenant = f"rebuild-{uuid.uuid4().hex[:8]}"
        config["auth"]["keys"][0]["tenant"] = tenant
        config["budgets"] = {tenant: {"daily_usd": 0.00000001}}
        config["reservations"] = TINY_HOLDS
        config["ledger"]["counters_check_s"] = 0.5
        gateway = start_gateway(log_dir, config)
        procs.append(gateway)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        spent = client.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": "spend"}], max_tokens=8
        )
        assert Decimal(spent.headers["x-tollway-cost-loaded-usd"]) > 0
        gateway.stop()  # writes its ledger rows before it exits

        redis_server.stop()
        redis_server.start()  # empty: the counters are gone
        keys = redis.Redis.from_url(redis_server.url)
        try:
            assert keys.keys("*spend*") == []
            path = tmp_path / "tollway.yaml"
            path.write_text(yaml.safe_dump(config))
            rebuilt = subprocess.run(
                [str(BIN / "tollway"), "db", "rebuild-counters", "--config", str(path)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert rebuilt.returncode == 0, rebuilt.stderr
            assert "rebuilt from the ledger" in rebuilt.stdout
            day = list(keys.keys(f"{{tollway:spend:{tenant}}}:day:*"))
            assert len(day) == 1  # the shared ledger has other tenants' too: this one's is there
            assert (
                int(keys.hget(day[0], "cost_loaded_nanos") or 0)
                >= Decimal(spent.headers["x-tollway-cost-loaded-usd"]) * 10**9
            )
            keys.flushall()  # lost again: now the next gateway's start rebuilds them
        finally:
            keys.close()

        gateway = start_gateway(log_dir, config)
        procs.append(gateway)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 10
        refused: openai.RateLimitError | None = None
        while refused is None:  # the budget check reads Redis's counters about once a second
            try:
                client.chat.completions.create(
                    model="sim-small", messages=[{"role": "user", "content": "more"}], max_tokens=4
                )
            except openai.RateLimitError as err:
                refused = err
            assert time.monotonic() < deadline, "the rebuilt spend never reached the budget"
            time.sleep(0.2)
        assert refused.code == "budget_exceeded"

        # Lost while the gateway runs: it notices within ledger.counters_check_s and
        # rebuilds them, so the spent budget stays spent.
        cost_nanos = Decimal(spent.headers["x-tollway-cost-loaded-usd"]) * 10**9
        with redis.Redis.from_url(redis_server.url) as keys:
            keys.flushall()
            lost_at = time.monotonic()
            while int(keys.hget(day[0], "cost_loaded_nanos") or 0) < cost_nanos:
                assert time.monotonic() - lost_at < 5, "the lost counters were not rebuilt"
                time.sleep(0.1)
        with pytest.raises(openai.RateLimitError) as again:
            client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": "more"}], max_tokens=4
            )
        assert again.value.code == "budget_exceeded"
