"""A real Prometheus scrapes a real gateway (simulator replicas, real Redis); every
dashboard query and every rule runs against what it collected.

Traffic is shaped so that no panel is empty by luck: cache misses and hits, a
stream (TTFT), routed ``auto`` requests to both tiers (score bands, routing
savings), a 400, a 401, a tenant over its budget (429), a dead replica in the
large tier (unhealthy) and a flaky one (503s, retried) and a Redis outage (failures counted).
It comes in two waves a few scrapes apart, so every rate has an increase.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import yaml

from tests.conftest import FAST_SIM, HARD, KEY, LEDGER_KEY, OTHER_KEY, gateway_config
from tests.deploy.prometheus_server import PrometheusServer, run_prometheus
from tests.deploy.promql import (
    RULES,
    PanelQuery,
    Rule,
    panel_queries,
    rules,
)
from tests.support.metrics import METRICS_TOKEN
from tests.support.procs import ROOT, Proc, free_port, start_gateway, start_sim
from tests.support.redis_server import RedisServer, run_redis
from tests.support.tools import needs

pytestmark = needs(shutil.which("prometheus") is not None, "Debian's prometheus")
COMPOSE_PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus.yml"


@dataclass
class Live:
    prom: PrometheusServer
    gateway: Proc
    redis: RedisServer


def chat(client: openai.OpenAI, model: str, content: str, **kw: object) -> dict[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        temperature=0,
        **kw,  # type: ignore[arg-type]
    )
    raw.parse()
    return dict(raw.headers)


def wave(gateway: Proc, n: int) -> None:
    acme = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    globex = openai.OpenAI(base_url=gateway.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    assert chat(acme, "sim-small", f"wave {n}: what is 2+2?")["x-tollway-cache"] == "miss"
    assert chat(acme, "sim-small", f"wave {n}: what is 2+2?")["x-tollway-cache"] == "hit"
    for i in range(3):
        chat(globex, "sim-large", f"wave {n}, large {i}")  # some retried off the dead replica
    assert chat(acme, "auto", f"hi there, wave {n}!")["x-tollway-tier"] == "small"
    assert chat(globex, "auto", f"{HARD}\n(wave {n})")["x-tollway-tier"] == "large"
    stream = acme.chat.completions.create(
        model="sim-large",
        messages=[{"role": "user", "content": f"stream, wave {n}"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [chunk for chunk in stream]
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        bad = http.post("/v1/chat/completions", json={"model": "sim-small"},
                        headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert bad.status_code == 400
        unauthorised = http.post("/v1/chat/completions", json={"model": "sim-small"})
        assert unauthorised.status_code == 401


def overload(gateway: Proc) -> None:
    """12 at once on small's 4 slots, each willing to wait 1 ms: most are shed (429)."""

    headers = {"authorization": f"Bearer {KEY}", "x-tollway-deadline-ms": "1"}

    def body(i: int) -> dict[str, object]:
        return {"model": "sim-small", "max_tokens": 24,
                "messages": [{"role": "user", "content": f"burst {i}"}]}  # fmt: skip

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            url = "/v1/chat/completions"
            answers = await asyncio.gather(
                *(http.post(url, json=body(i), headers=headers) for i in range(12))
            )
        return [a.status_code for a in answers]

    statuses = asyncio.run(burst())
    assert 429 in statuses, statuses
    assert 200 in statuses, statuses


def fallback(gateway: Proc) -> None:
    """The spare tier has no live replica: its requests are served by small."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    headers = chat(client, "sim-spare", "to the spare tier")
    assert headers["x-tollway-tier"] == "small"
    assert headers["x-tollway-fallback-reason"] == "unavailable"


def over_budget(gateway: Proc) -> None:
    """initech's daily budget is ten nano-dollars, less than a request's worst case once
    the gateway has seen the tier's costs: its requests get 429 budget_exceeded (the
    first may pass, held at the tiny price the tier has before it has served anything)."""
    headers = {"authorization": f"Bearer {LEDGER_KEY}"}
    body = {"model": "sim-small", "max_tokens": 4,
            "messages": [{"role": "user", "content": "spend the budget"}]}  # fmt: skip
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        deadline = time.monotonic() + 10
        while (answer := http.post("/v1/chat/completions", json=body, headers=headers)).is_success:
            assert time.monotonic() < deadline, "initech was never refused"
            time.sleep(0.2)
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "budget_exceeded"


def redis_outage(gateway: Proc, redis: RedisServer) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    redis.stop()
    try:
        for i in range(3):  # cache lookups and ledger writes fail open
            chat(client, "sim-small", f"during the outage {i}")
    finally:
        redis.start()
    time.sleep(2.5)  # the gateway skips Redis for about a second after a failure


def live_config(small: Proc, large: list[Proc], redis_url: str) -> dict[str, object]:
    config = gateway_config([small.url], [s.url for s in large], redis_url)
    # A third tier whose only replica never lived, falling back to small.
    config["tiers"].append(
        {
            "name": "spare",
            "models": ["sim-spare"],
            "replicas": [{"url": f"http://127.0.0.1:{free_port()}", "max_num_seqs": 4}],
            "fallback": ["small"],
        }
    )
    config["routing"] = {
        "aliases": ["auto"],
        "cut_points": [0.3, 1.0],  # spare owns no score
        "burn_target_usd_per_hour": 1000,  # active, never reached: the burn gauge is exported
    }
    config["budgets"] = {"initech": {"daily_usd": 0.00000001}}
    # A first request's hold is a few nano-dollars (it fits), its cost is not.
    config["reservations"] = {"unobserved_usd_per_mtok": 0.0001}
    config["cache"] = {"local_ttl_s": 0}  # hits go to Redis, so the outage is seen
    return config


def static_job(name: str, procs: list[Proc]) -> dict[str, object]:
    targets = [p.url.removeprefix("http://") for p in procs]
    return {"job_name": name, "static_configs": [{"targets": targets}]}


def gateway_job(gateway: Proc, workdir: Path) -> dict[str, object]:
    """The compose stack's gateway job (deploy/compose/prometheus.yml), aimed at ``gateway``:
    it sends the metrics token from a file, as Prometheus there reads compose's secret."""
    shipped = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "tollway-gateway"]
    token = workdir / "metrics-token"
    token.write_text(METRICS_TOKEN + "\n")
    return {
        **static_job("tollway-gateway", [gateway]),
        "authorization": {**job["authorization"], "credentials_file": str(token)},
    }


def constants_for_test(workdir: Path) -> Path:
    """The shipped constants, plus a budget for acme: what an operator would add."""
    text = (RULES / "constants.yml").read_text()
    text += (
        "      - record: tenant:tollway_budget_usd_per_day\n"
        '        expr: label_replace(vector(5), "tenant", "acme", "", "")\n'
    )
    path = workdir / "constants.yml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("live-prometheus")
    procs: list[Proc] = []
    with run_redis() as redis:
        try:
            small = start_sim(workdir, ["sim-small"], *FAST_SIM)
            # large: a flaky replica (every answer a 503, retried on the next one), a good
            # one, and one that is dead from the start
            flaky = ["--error-rate", "1.0", "--error-status", "503"]
            large = [start_sim(workdir, ["sim-large"], *FAST_SIM, *flaky)]
            large += [start_sim(workdir, ["sim-large"], *FAST_SIM) for _ in range(2)]
            procs += [small, *large]
            gateway = start_gateway(workdir, live_config(small, large, redis.url))
            procs.append(gateway)
            scrape = [
                gateway_job(gateway, workdir),
                static_job("vllm", [small, *large[:2]]),
            ]
            rule_files = [
                RULES / "recording.yml",
                RULES / "alerts.yml",
                constants_for_test(workdir),
            ]
            with run_prometheus(workdir, scrape, rule_files) as prom:
                large[2].stop()
                prom.wait_for('up{job="tollway-gateway"} == 1')
                wave(gateway, 1)
                overload(gateway)
                fallback(gateway)
                over_budget(gateway)
                time.sleep(3)  # a few scrapes: every counter has a first sample
                wave(gateway, 2)
                redis_outage(gateway, redis)
                wave(gateway, 3)
                overload(gateway)
                fallback(gateway)
                prom.wait_for("tier:tollway_cost_per_1k_requests_usd:rate5m")
                time.sleep(3)
                yield Live(prom, gateway, redis)
        finally:
            for proc in reversed(procs):
                proc.stop()


QUERIES = list(panel_queries())


@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_every_panel_query_returns_data(live: Live, query: PanelQuery) -> None:
    result = live.prom.wait_for(query.resolved(), timeout=10)
    assert result, f"{query.id}: no data for {query.resolved()}"


RECORDS = [r for r in rules(RULES / "recording.yml") if not r.alert]


@pytest.mark.parametrize("rule", RECORDS, ids=[r.name for r in RECORDS])
def test_every_recording_rule_has_data(live: Live, rule: Rule) -> None:
    assert live.prom.wait_for(rule.name, timeout=10), f"{rule.name}: recorded nothing"


def test_rules_load_and_evaluate_without_error(live: Live) -> None:
    groups = live.prom.api("rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert {r.name for r in rules()} <= loaded
    broken = {r["name"]: r.get("lastError") for g in groups for r in g["rules"]
              if r["health"] != "ok"}  # fmt: skip
    assert not broken


def test_dashboard_variables_have_values(live: Live) -> None:
    assert {"small", "large"} <= set(live.prom.api("label/tier/values"))
    assert {"acme", "globex"} <= set(live.prom.api("label/tenant/values"))


def test_the_traffic_made_the_rare_series(live: Live) -> None:
    """The series that only unusual traffic makes are there, with the values it implies."""
    prom = live.prom
    assert prom.query("sum(tollway_redis_failures_total) > 0")
    assert prom.query('tollway_requests_total{status="429"}')
    assert prom.query('tollway_upstream_attempts_total{tier="large",outcome!="ok"}')
    assert prom.query('tier:tollway_retry_inflation:rate5m{tier="large"} > 1')
    assert prom.query("tollway_replica_healthy == 0")
    assert prom.query('tier:tollway_cache_hit_ratio:rate5m{tier="small"} > 0')
    bands = {r["metric"]["tier"] for r in prom.query("tollway_route_decisions_total")}
    assert bands == {"small", "large"}
