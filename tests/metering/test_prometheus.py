"""GatewayMetrics: what a scrape shows after the gateway's calls, parsed back from its text."""

from __future__ import annotations

import logging
import re
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import metering.prometheus
from metering.money import fmt_nanos, to_nanos
from metering.occupancy import OccupancyLedger
from metering.pricing import Cost
from metering.prometheus import GatewayMetrics, ReplicaGpu
from metering.report import RequestReport
from metering.usage import TokenUsage

Series = list[tuple[dict[str, str], float]]


BASE = RequestReport(
    request_id="req-1", tenant="acme", tier="small", model="llama-8b", operation="chat"
)


def report(**changes: Any) -> RequestReport:
    return BASE._replace(**changes)


def observe(
    m: GatewayMetrics, rep: RequestReport, *, duration_s: float, ttft_s: float | None
) -> None:
    m.observe_requests([rep._replace(duration_s=duration_s, ttft_s=ttft_s)])


def usd(marginal: str, loaded: str) -> Cost:
    return Cost.of_usd(Decimal(marginal), Decimal(loaded))


def scrape(metrics: GatewayMetrics) -> dict[str, Series]:
    """Every sample of one scrape, by sample name, sorted by labels."""
    body, _ = metrics.render()
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return {name: rows(*series) for name, series in out.items()}


def rows(*series: tuple[dict[str, str], float]) -> Series:
    """Samples in a canonical order, so expectations need not follow the exposition's."""
    return sorted(series, key=lambda s: sorted(s[0].items()))


ACME = {"tier": "small", "model": "llama-8b", "tenant": "acme"}


def test_request_counters_sum_tokens_gpu_and_dollars() -> None:
    m = GatewayMetrics()
    for _ in range(2):
        observe(
            m,
            report(
                usage=TokenUsage(100, 20, 64),
                gpu_us=250_000,
                cost=usd("0.000100000", "0.000300000"),
                attempts=1,
            ),
            duration_s=0.4,
            ttft_s=0.1,
        )
    observe(
        m,
        report(tenant="globex", status=500, usage=TokenUsage(7, 0), gpu_us=500_000),
        duration_s=0.2,
        ttft_s=None,
    )
    s = scrape(m)

    assert s["tollway_requests_total"] == rows(
        ({**ACME, "status": "200", "cache": "miss"}, 2.0),
        ({**ACME, "tenant": "globex", "status": "500", "cache": "miss"}, 1.0),
    )
    assert s["tollway_tokens_total"] == rows(
        ({**ACME, "cache": "miss", "kind": "completion"}, 40.0),
        ({**ACME, "cache": "miss", "kind": "prompt"}, 200.0),
        ({**ACME, "tenant": "globex", "cache": "miss", "kind": "completion"}, 0.0),
        ({**ACME, "tenant": "globex", "cache": "miss", "kind": "prompt"}, 7.0),
    )
    assert s["tollway_cached_prompt_tokens_total"] == rows(
        ({**ACME, "cache": "miss"}, 128.0),
        ({**ACME, "tenant": "globex", "cache": "miss"}, 0.0),
    )
    assert s["tollway_gpu_seconds_total"] == rows(
        (ACME, 0.5),
        ({**ACME, "tenant": "globex"}, 0.5),
    )
    assert s["tollway_cost_marginal_usd_total"] == rows(
        (ACME, 0.0002),
        ({**ACME, "tenant": "globex"}, 0.0),
    )
    assert s["tollway_cost_loaded_usd_total"] == rows(
        (ACME, 0.0006),
        ({**ACME, "tenant": "globex"}, 0.0),
    )
    assert s["tollway_upstream_requests_total"] == [({"tier": "small"}, 2.0)]
    assert "tollway_cost_saved_usd_total" not in s  # nothing was saved: no zero series


def test_dollars_are_summed_exactly_then_converted() -> None:
    m = GatewayMetrics()
    for _ in range(3):
        observe(m, report(cost=usd("0.1", "0.1")), duration_s=0.1, ttft_s=None)
    # float addition would give 0.30000000000000004
    assert scrape(m)["tollway_cost_marginal_usd_total"] == [(ACME, 0.3)]


def test_dollars_and_gpu_seconds_equal_the_sum_of_the_headers() -> None:
    m = GatewayMetrics()
    nanos = [123_456_789 * (i % 7 + 1) + i for i in range(1000)]
    micros = [250_001 * (i % 5 + 1) + i for i in range(1000)]
    for marginal, gpu_us in zip(nanos, micros, strict=True):  # one batch each
        m.observe_requests([report(cost=Cost(marginal, marginal), gpu_us=gpu_us)])
    headers = sum(Decimal(fmt_nanos(n)) for n in nanos)  # what x-tollway-cost-usd printed
    gpu_headers = sum(Decimal(f"{n // 1_000_000}.{n % 1_000_000:06d}") for n in micros)
    s = scrape(m)

    assert s["tollway_cost_marginal_usd_total"] == [(ACME, float(headers))]
    assert s["tollway_cost_loaded_usd_total"] == [(ACME, float(headers))]
    assert s["tollway_gpu_seconds_total"] == [(ACME, float(gpu_headers))]
    float_sum = 0.0
    for n in nanos:
        float_sum += n / 1e9
    assert float_sum != float(headers)  # adding floats, as a plain Counter does, would drift


def test_savings_are_counted_by_cache_result() -> None:
    m = GatewayMetrics()
    observe(m, report(cache="miss"), duration_s=1.0, ttft_s=0.2)
    observe(
        m,
        report(cache="hit", saved_nanos=to_nanos(Decimal("0.000250000"))),
        duration_s=0.01,
        ttft_s=0.01,
    )
    observe(
        m,
        report(cache="hit", saved_nanos=to_nanos(Decimal("0.000050000"))),
        duration_s=0.01,
        ttft_s=0.01,
    )
    observe(
        m, report(cache="replay", saved_nanos=to_nanos(Decimal(0))), duration_s=0.01, ttft_s=None
    )
    s = scrape(m)

    assert s["tollway_cost_saved_usd_total"] == rows(
        ({**ACME, "cache": "hit"}, 0.0003),
        ({**ACME, "cache": "replay"}, 0.0),
    )
    assert s["tollway_requests_total"] == rows(
        ({**ACME, "status": "200", "cache": "hit"}, 2.0),
        ({**ACME, "status": "200", "cache": "miss"}, 1.0),
        ({**ACME, "status": "200", "cache": "replay"}, 1.0),
    )


def test_latency_histograms_are_cumulative_with_inclusive_bounds() -> None:
    m = GatewayMetrics()
    for duration, ttft in [(0.05, 0.05), (0.3, None), (500.0, 0.2)]:
        observe(m, report(), duration_s=duration, ttft_s=ttft)
    s = scrape(m)
    labels = {"tier": "small", "model": "llama-8b", "cache": "miss"}

    def buckets(counts: dict[str, float]) -> Series:
        return rows(*[({**labels, "le": le}, n) for le, n in counts.items()])

    assert s["tollway_request_duration_seconds_bucket"] == buckets({
        "0.005": 0, "0.01": 0, "0.025": 0, "0.05": 1, "0.1": 1, "0.25": 1, "0.5": 2, "1.0": 2,
        "2.5": 2, "5.0": 2, "10.0": 2, "20.0": 2, "30.0": 2, "60.0": 2, "120.0": 2, "300.0": 2,
        "+Inf": 3,
    })  # fmt: skip
    assert s["tollway_request_duration_seconds_count"] == [(labels, 3.0)]
    assert s["tollway_request_duration_seconds_sum"] == [(labels, 500.35)]
    assert s["tollway_time_to_first_token_seconds_bucket"] == buckets({
        "0.005": 0, "0.01": 0, "0.025": 0, "0.05": 1, "0.075": 1, "0.1": 1, "0.15": 1, "0.25": 2,
        "0.5": 2, "0.75": 2, "1.0": 2, "2.5": 2, "5.0": 2, "10.0": 2, "30.0": 2, "120.0": 2,
        "+Inf": 2,
    })  # fmt: skip
    assert s["tollway_time_to_first_token_seconds_count"] == [(labels, 2.0)]
    assert s["tollway_time_to_first_token_seconds_sum"] == [(labels, 0.25)]


def test_retry_inflation_is_attempts_over_upstream_requests() -> None:
    m = GatewayMetrics()
    m.observe_attempt("small", "http://a:8000", "connect_error")
    m.observe_attempt("small", "http://b:8000", "status_5xx")
    m.observe_attempt("small", "http://a:8000", "ok")
    observe(m, report(attempts=3), duration_s=1.0, ttft_s=0.5)
    m.observe_attempt("small", "http://a:8000", "ok")
    observe(m, report(attempts=1), duration_s=1.0, ttft_s=0.5)
    observe(m, report(cache="hit", attempts=0), duration_s=0.01, ttft_s=0.01)
    s = scrape(m)

    assert s["tollway_upstream_attempts_total"] == rows(
        ({"tier": "small", "replica": "http://a:8000", "outcome": "connect_error"}, 1.0),
        ({"tier": "small", "replica": "http://a:8000", "outcome": "ok"}, 2.0),
        ({"tier": "small", "replica": "http://b:8000", "outcome": "status_5xx"}, 1.0),
    )
    assert s["tollway_upstream_requests_total"] == [({"tier": "small"}, 2.0)]
    attempts = sum(v for _, v in s["tollway_upstream_attempts_total"])
    assert attempts / s["tollway_upstream_requests_total"][0][1] == 2.0


def test_empty_labels_become_none() -> None:
    m = GatewayMetrics()
    observe(m, report(tenant="", tier="", model="", status=401), duration_s=0.001, ttft_s=None)
    none = {"tier": "none", "model": "none", "tenant": "none"}
    assert scrape(m)["tollway_requests_total"] == rows(
        ({**none, "status": "401", "cache": "miss"}, 1.0)
    )


def test_tenants_and_models_past_the_cap_are_other() -> None:
    m = GatewayMetrics(max_tenants=2, max_models=1)
    for tenant in ["a", "b", "c", "a", "d", "c"]:
        observe(m, report(tenant=tenant), duration_s=0.1, ttft_s=None)
    observe(m, report(tenant="a", model="random-name"), duration_s=0.1, ttft_s=None)
    s = scrape(m)

    def row(tenant: str, model: str, n: float) -> tuple[dict[str, str], float]:
        labels = {"tier": "small", "model": model, "tenant": tenant}
        return ({**labels, "status": "200", "cache": "miss"}, n)

    assert s["tollway_requests_total"] == rows(
        row("a", "llama-8b", 2.0),
        row("a", "other", 1.0),
        row("b", "llama-8b", 1.0),
        row("other", "llama-8b", 3.0),
    )
    for n in range(1000):  # however many more come, no new series
        observe(m, report(tenant=f"t{n}"), duration_s=0.1, ttft_s=None)
    assert scrape(m)["tollway_requests_total"] == rows(
        row("a", "llama-8b", 2.0),
        row("a", "other", 1.0),
        row("b", "llama-8b", 1.0),
        row("other", "llama-8b", 1003.0),
    )


def test_a_report_with_a_negative_figure_is_not_counted_and_the_rest_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = GatewayMetrics()
    bad = report(request_id="req-bad", usage=TokenUsage(-5, 3))
    with caplog.at_level(logging.ERROR, logger="metering.prometheus"):
        m.observe_requests([report(), bad, report(cost=Cost(-1, 0)), report()])
    s = scrape(m)

    assert s["tollway_requests_total"] == [({**ACME, "status": "200", "cache": "miss"}, 2.0)]
    assert s["tollway_telemetry_failures_total"] == [({"kind": "negative_figure"}, 2.0)]
    assert [r.message for r in caplog.records] == [
        "request req-bad has a negative figure: not counted",
        "request req-1 has a negative figure: not counted",
    ]


def test_instances_do_not_share_values() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    observe(first, report(), duration_s=0.1, ttft_s=None)
    first.redis_failure("get")
    second.redis_failure("get")
    second.redis_failure("get")

    assert first.registry is not second.registry
    assert scrape(first)["tollway_requests_total"] == rows(
        ({**ACME, "status": "200", "cache": "miss"}, 1.0)
    )
    assert "tollway_requests_total" not in scrape(second)
    assert scrape(first)["tollway_redis_failures_total"] == [({"operation": "get"}, 1.0)]
    assert scrape(second)["tollway_redis_failures_total"] == [({"operation": "get"}, 2.0)]


def test_replica_source_is_read_at_every_scrape() -> None:
    m = GatewayMetrics()
    ledger = OccupancyLedger(gpus=2, now=0.0)
    calls = 0

    def source() -> list[ReplicaGpu]:
        nonlocal calls
        calls += 1
        snap = ledger.snapshot(now=clock)
        return [ReplicaGpu.from_occupancy("http://a:8000", "small", snap, healthy=True, slots=4)]

    m.register_replica_source(source)
    assert calls == 0
    ledger.start("r1", now=1.0)
    clock = 3.0
    first = scrape(m)
    ledger.finish("r1", now=4.0)
    clock = 10.0
    second = scrape(m)
    assert calls == 2

    labels = {"replica": "http://a:8000", "tier": "small"}
    assert first["tollway_replica_gpu_seconds_total"] == rows(
        ({**labels, "state": "busy"}, 4.0),  # accrued by the running request
        ({**labels, "state": "foreign"}, 0.0),
        ({**labels, "state": "idle"}, 2.0),
    )
    assert first["tollway_replica_in_flight"] == [(labels, 1.0)]
    assert second["tollway_replica_gpu_seconds_total"] == rows(
        ({**labels, "state": "busy"}, 6.0),
        ({**labels, "state": "foreign"}, 0.0),
        ({**labels, "state": "idle"}, 14.0),  # busy + foreign + idle = 10 s x 2 GPUs
    )
    assert second["tollway_replica_in_flight"] == [(labels, 0.0)]
    assert second["tollway_replica_slots"] == [(labels, 4.0)]
    assert second["tollway_replica_healthy"] == [(labels, 1.0)]


def test_unhealthy_replica_and_unknown_slots() -> None:
    m = GatewayMetrics()
    m.register_replica_source(
        lambda: [ReplicaGpu("http://b:8000", "small+large", 1, 2, 3, 0, False)]
    )
    s = scrape(m)
    labels = {"replica": "http://b:8000", "tier": "small+large"}
    assert s["tollway_replica_healthy"] == [(labels, 0.0)]
    assert "tollway_replica_slots" not in s


def test_a_failing_replica_source_does_not_break_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> list[ReplicaGpu]:
        raise RuntimeError("pool gone")

    m = GatewayMetrics()
    m.ledger_rows_written(7)
    m.register_replica_source(broken)
    with caplog.at_level(logging.ERROR, logger="metering.prometheus"):
        first = scrape(m)
        second = scrape(m)

    assert first["tollway_ledger_rows_written_total"] == [({}, 7.0)]
    assert "tollway_replica_gpu_seconds_total" not in first
    # counted during the first scrape, after its own family was already exported
    assert second["tollway_telemetry_failures_total"] == [({"kind": "replica_source"}, 1.0)]
    assert [r.message for r in caplog.records] == ["replica metrics source failed"] * 2


def test_queue_cache_and_fail_open_counters() -> None:
    m = GatewayMetrics()
    m.observe_queue("large", 12)
    m.observe_queue("large", 5)
    m.observe_queue_wait("large", 0.3)
    m.observe_queue_wait("large", 0.001)
    m.cache_event("small", "hit")
    m.cache_event("small", "hit")
    m.cache_event("small", "error")
    m.redis_failure("set")
    m.ledger_rows_dropped("spool_full", 3)
    m.ledger_rows_written(40)
    waiting = [12]
    m.register_spool_source(lambda: waiting[0])
    m.telemetry_failure("otlp_export")
    s = scrape(m)

    assert s["tollway_queue_depth"] == [({"tier": "large"}, 5.0)]
    assert s["tollway_queue_wait_seconds_count"] == [({"tier": "large"}, 2.0)]
    assert s["tollway_queue_wait_seconds_sum"] == [({"tier": "large"}, 0.301)]
    assert s["tollway_cache_requests_total"] == rows(
        ({"tier": "small", "result": "error"}, 1.0),
        ({"tier": "small", "result": "hit"}, 2.0),
    )
    assert s["tollway_redis_failures_total"] == [({"operation": "set"}, 1.0)]
    assert s["tollway_ledger_rows_dropped_total"] == [({"reason": "spool_full"}, 3.0)]
    assert s["tollway_ledger_rows_written_total"] == [({}, 40.0)]
    assert s["tollway_ledger_spool_rows"] == [({}, 12.0)]
    waiting[0] = 0  # read at each scrape
    assert scrape(m)["tollway_ledger_spool_rows"] == [({}, 0.0)]
    assert s["tollway_telemetry_failures_total"] == [({"kind": "otlp_export"}, 1.0)]


def test_exposition_matches_the_documented_names_and_types() -> None:
    m = GatewayMetrics()
    observe(
        m, report(cache="hit", saved_nanos=to_nanos(Decimal("0.1"))), duration_s=0.1, ttft_s=0.1
    )
    m.observe_attempt("small", "http://a:8000", "ok")
    m.observe_queue("small", 1)
    m.observe_burn("gateway", 2.5)
    m.observe_queue_wait("small", 0.1)
    m.cache_event("small", "hit")
    m.redis_failure("get")
    m.telemetry_failure("span")
    m.shed("small", "deadline")
    m.fallback("small", "large", "unavailable")
    m.ejection("http://a:8000", "small")
    m.observe_route("small", 0.25)
    m.ledger_rows_written(1)
    m.ledger_rows_dropped("rejected", 1)
    m.budget_unchecked("acme")
    m.register_spool_source(lambda: 0)
    m.register_replica_source(lambda: [ReplicaGpu("http://a:8000", "small", 1, 1, 0, 1, True, 4)])
    body, content_type = m.render()

    assert content_type == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    table = re.findall(
        r"^  (\w+)\s+(counter|gauge|histogram)\s", metering.prometheus.__doc__ or "", re.M
    )
    documented = {f"tollway_{name.removesuffix('_total')}": typ for name, typ in table}
    assert {name: f.type for name, f in families.items()} == documented
    for family in families.values():
        assert family.documentation
        assert family.samples  # every family has data once everything is fed
        if family.type == "counter":
            assert {s.name for s in family.samples} == {family.name + "_total"}
    assert b"_created" not in body


def test_created_series_are_dropped_from_this_registry_only() -> None:
    m = GatewayMetrics()
    observe(m, report(), duration_s=0.1, ttft_s=0.1)
    m.observe_queue_wait("small", 0.1)
    other = CollectorRegistry()
    Counter("someone_elses_total", "Another library's counter.", registry=other).inc()

    assert b"_created" not in m.render()[0]
    assert b"someone_elses_created" in generate_latest(other)  # no process-wide switch


def test_burn_rate_gauge_by_scope() -> None:
    m = GatewayMetrics(max_tenants=1)
    m.observe_burn("gateway", 2.5)
    m.observe_burn("acme", 1.0)
    m.observe_burn("globex", 3.0)  # past the tenant cap: "other"
    body, _ = m.render()
    samples = {
        s.labels["scope"]: s.value
        for family in text_string_to_metric_families(body.decode())
        if family.name == "tollway_burn_rate_usd_per_hour"
        for s in family.samples
    }
    assert samples == {"gateway": 2.5, "acme": 1.0, "other": 3.0}
