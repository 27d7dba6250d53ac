"""The Grafana dashboards as code: ``python deploy/grafana/dashboards.py`` writes dashboards/.

Three dashboards for three audiences: *executive* (spend, forecast, cost per
1k requests, savings), *on-call* (rates, queue, shedding, retries, replica
health, errors) and *debug* (latency, TTFT, batch occupancy, routing bands,
most expensive tenants and models). Every query reads a metric the gateway
exports (metering/prometheus.py), a series recorded by
deploy/prometheus/rules/*.yml, or vLLM's own ``vllm:*`` metrics;
tests/deploy runs each one against a real Prometheus scraping a real gateway.

The JSON is committed (Grafana provisions it from disk); a test fails when it
differs from what this module generates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TIER = 'tier=~"$tier"'
TENANT = 'tenant=~"$tenant"'
SEL = f"{{{TIER},{TENANT}}}"  # both variables, as a label selector
LOADED = "tollway_cost_loaded_usd_total"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # timeseries | stat | gauge | piechart | bargauge | table | heatmap
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel] = field(default_factory=list)
    variables: tuple[str, ...] = ("tier", "tenant")


def q(expr: str, legend: str = "", *, instant: bool = False) -> Query:
    return Query(" ".join(expr.split()), legend, instant)


def variable(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": f"label_values(tollway_requests_total, {name})", "refId": name},
        "definition": f"label_values(tollway_requests_total, {name})",
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "refresh": 2,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
    }


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "instant": query.instant,
            "range": not query.instant,
            **({"format": "heatmap"} if panel.kind == "heatmap" else {}),
        }
        for i, query in enumerate(panel.queries)
    ]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
    }


def dashboard_json(dash: Dashboard) -> dict[str, Any]:
    panels, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(dash.panels, start=1):
        if x + panel.width > 24:  # next row
            x, y, row_height = 0, y + row_height, 0
        panels.append(panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": ["tollway"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [datasource_variable(), *(variable(name) for name in dash.variables)]
        },
        "panels": panels,
    }


def executive() -> Dashboard:
    spend_1d = f"sum(increase(tollway_cost_loaded_usd_total{{{TIER},{TENANT}}}[1d]))"
    return Dashboard(
        "tollway-executive",
        "tollway / executive",
        "What the GPUs cost, where the money goes, what tollway saved. Loaded USD.",
        [
            Panel(
                "Spend, last 24 h",
                (q(spend_1d, "spend", instant=True),),
                "stat",
                "currencyUSD",
                "Fully loaded cost (GPU time, idle share, overhead) over the last 24 hours.",
                width=6,
                height=5,
            ),
            Panel(
                "Forecast for today",
                (q("tollway:cost_loaded_usd_forecast_per_day:rate1h", "forecast", instant=True),),
                "stat",
                "currencyUSD",
                "24 x the last hour's spend rate.",
                width=6,
                height=5,
            ),
            Panel(
                "Daily budget",
                (q("tollway:budget_usd_per_day", "budget", instant=True),),
                "stat",
                "currencyUSD",
                "Set in deploy/prometheus/rules/constants.yml.",
                width=6,
                height=5,
            ),
            Panel(
                "Burn rate vs budget",
                (q("tollway:cost_burn_ratio:rate1h", "1h", instant=True),),
                "gauge",
                "percentunit",
                "Spend pace over the budget's pace; 1 = on budget.",
                width=6,
                height=5,
            ),
            Panel(
                "Spend per day by tier",
                (
                    q(
                        f"sum by (tier) (increase({LOADED}{SEL}[1d]))",
                        "{{tier}}",
                    ),
                ),
                unit="currencyUSD",
                description="Rolling 24-hour spend; read at midnight for a calendar day.",
            ),
            Panel(
                "Spend rate and forecast",
                (
                    q("tollway:cost_loaded_usd_per_hour:rate1h * 24", "forecast USD/day"),
                    q("tollway:budget_usd_per_day", "budget USD/day"),
                ),
                unit="currencyUSD",
            ),
            Panel(
                "Cost per 1k requests by tier",
                (q(f"tier:tollway_cost_per_1k_requests_usd:rate5m{{{TIER}}}", "{{tier}}"),),
                unit="currencyUSD",
            ),
            Panel(
                "Cost per 1k requests by tenant",
                (
                    q(
                        f"tier_tenant:tollway_cost_per_1k_requests_usd:rate5m{{{TIER},{TENANT}}}",
                        "{{tenant}} / {{tier}}",
                    ),
                ),
                unit="currencyUSD",
            ),
            Panel(
                "Cost breakdown by tier (24 h)",
                (
                    q(
                        f"sum by (tier) (increase({LOADED}{SEL}[1d]))",
                        "{{tier}}",
                        instant=True,
                    ),
                ),
                "piechart",
                "currencyUSD",
                width=8,
            ),
            Panel(
                "Cost breakdown by tenant (24 h, top 10)",
                (
                    q(
                        f"topk(10, sum by (tenant) "
                        f"(increase(tollway_cost_loaded_usd_total{{{TIER},{TENANT}}}[1d])))",
                        "{{tenant}}",
                        instant=True,
                    ),
                ),
                "piechart",
                "currencyUSD",
                width=8,
            ),
            Panel(
                "Marginal GPU cost vs idle and overhead (USD/h)",
                (
                    q(
                        f"3600 * sum(rate(tollway_cost_marginal_usd_total{{{TIER},{TENANT}}}[5m]))",
                        "marginal (GPU time used)",
                    ),
                    q(
                        f"3600 * (sum(rate(tollway_cost_loaded_usd_total{{{TIER},{TENANT}}}[5m]))"
                        f" - sum(rate(tollway_cost_marginal_usd_total{{{TIER},{TENANT}}}[5m])))",
                        "idle share + overhead",
                    ),
                ),
                unit="currencyUSD",
                width=8,
            ),
            Panel(
                "Savings by source (USD/h)",
                (
                    q(
                        f"3600 * sum by (cache) "
                        f"(tier_tenant_cache:tollway_cost_saved_usd:rate5m{{{TIER},{TENANT}}})",
                        "{{cache}}",
                    ),
                    q("3600 * tollway:routing_saved_usd:rate1h", "routing (estimate)"),
                ),
                unit="currencyUSD",
                description="hit = response cache, coalesced = in-flight dedupe, replay = "
                "Idempotency-Key; routing = routed requests priced at the dearest tier, minus "
                "what they cost.",
            ),
            Panel(
                "Saved, last 24 h",
                (
                    q(
                        f"sum(increase(tollway_cost_saved_usd_total{{{TIER},{TENANT}}}[1d]))",
                        "saved",
                        instant=True,
                    ),
                ),
                "stat",
                "currencyUSD",
            ),
        ],
    )


def on_call() -> Dashboard:
    return Dashboard(
        "tollway-oncall",
        "tollway / on-call",
        "Is it up, is it shedding, is it burning money: the first screen of an incident.",
        [
            Panel(
                "Requests by tier and status",
                (
                    q(
                        f"sum by (tier, status) (rate(tollway_requests_total{{{TIER}}}[5m]))",
                        "{{tier}} {{status}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Cost rate by tier (USD/h)",
                (
                    q(
                        "3600 * sum by (tier) "
                        f"(tier_tenant:tollway_cost_loaded_usd:rate5m{{{TIER}}})",
                        "{{tier}}",
                    ),
                    q(
                        'tollway_burn_rate_usd_per_hour{scope="gateway"}',
                        "gateway burn (routing window) {{instance}}",
                    ),
                ),
                unit="currencyUSD",
            ),
            Panel(
                "Burn rate vs budget, by alert window",
                (
                    q("tollway:cost_burn_ratio:rate5m", "5m"),
                    q("tollway:cost_burn_ratio:rate30m", "30m"),
                    q("tollway:cost_burn_ratio:rate1h", "1h"),
                    q("tollway:cost_burn_ratio:rate6h", "6h"),
                ),
                unit="percentunit",
                description="Pages at 2x on 1h and 5m; a ticket at 1.1x on 6h and 30m.",
            ),
            Panel(
                "Queue depth",
                (q(f"tier:tollway_queue_depth:sum{{{TIER}}}", "{{tier}}"),),
                description="Requests awaiting admission, all gateways. vLLM scales on this.",
            ),
            Panel(
                "Shed requests (429)",
                (q(f"tier_reason:tollway_shed:rate5m{{{TIER}}}", "{{tier}} {{reason}}"),),
                unit="reqps",
            ),
            Panel(
                "Fallbacks to another tier",
                (
                    q(
                        "sum by (from_tier, to_tier, reason) (rate(tollway_fallbacks_total[5m]))",
                        "{{from_tier}} -> {{to_tier}} ({{reason}})",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Retry inflation",
                (q(f"tier:tollway_retry_inflation:rate5m{{{TIER}}}", "{{tier}}"),),
                description="Upstream attempts per request that went upstream; alert at 1.2.",
            ),
            Panel(
                "Upstream attempts by outcome",
                (
                    q(
                        "sum by (tier, outcome) "
                        f"(rate(tollway_upstream_attempts_total{{{TIER}}}[5m]))",
                        "{{tier}} {{outcome}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Replica health",
                (q("max by (replica, tier) (tollway_replica_healthy)", "{{replica}} ({{tier}})"),),
                description="1 = healthy to at least one gateway.",
            ),
            Panel(
                "Replicas ejected",
                (q("max by (replica, tier) (tollway_replica_ejected)", "{{replica}} ({{tier}})"),),
            ),
            Panel(
                "Error ratio (5xx)",
                (q("tier:tollway_error_ratio:rate5m", "{{tier}}"),),
                unit="percentunit",
            ),
            Panel(
                "Cache hit ratio",
                (q(f"tier:tollway_cache_hit_ratio:rate5m{{{TIER}}}", "{{tier}}"),),
                unit="percentunit",
            ),
            Panel(
                "Redis failures (failed open)",
                (
                    q(
                        "sum by (operation) (rate(tollway_redis_failures_total[5m]))",
                        "{{operation}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Healthy replicas per tier",
                (q("tier:tollway_replicas_healthy:count", "{{tier}}"),),
            ),
        ],
    )


def debug() -> Dashboard:
    def quantiles(metric: str) -> tuple[Query, ...]:
        return tuple(
            q(
                f"histogram_quantile({p}, sum by (tier, le) (rate({metric}_bucket{{{TIER}}}[5m])))",
                f"p{int(p * 100)} {{{{tier}}}}",
            )
            for p in (0.5, 0.95, 0.99)
        )

    return Dashboard(
        "tollway-debug",
        "tollway / debug",
        "Why a tier is slow or dear: latency, batches, routing, the most expensive callers.",
        [
            Panel("Request duration", quantiles("tollway_request_duration_seconds"), unit="s"),
            Panel(
                "Time to first token", quantiles("tollway_time_to_first_token_seconds"), unit="s"
            ),
            Panel(
                "Request duration histogram",
                (
                    q(
                        "sum by (le) "
                        f"(rate(tollway_request_duration_seconds_bucket{{{TIER}}}[5m]))",
                        "{{le}}",
                    ),
                ),
                "heatmap",
            ),
            Panel(
                "TTFT histogram",
                (
                    q(
                        "sum by (le) "
                        f"(rate(tollway_time_to_first_token_seconds_bucket{{{TIER}}}[5m]))",
                        "{{le}}",
                    ),
                ),
                "heatmap",
            ),
            Panel(
                "Batch occupancy per replica (gateway view)",
                (
                    q(
                        "sum by (replica, tier) (tollway_replica_in_flight) / on (replica, tier) "
                        "max by (replica, tier) (tollway_replica_slots)",
                        "{{replica}}",
                    ),
                ),
                unit="percentunit",
                description="Requests in flight over max_num_seqs, summed over gateways.",
            ),
            Panel(
                "vLLM running and waiting per replica",
                (
                    q("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
                    q("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
                ),
            ),
            Panel(
                "GPU utilisation per replica",
                (q("replica:tollway_gpu_utilisation:ratio_rate5m", "{{replica}}"),),
                unit="percentunit",
            ),
            Panel(
                "KV cache usage per replica",
                (q("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}"),),
                unit="percentunit",
            ),
            Panel(
                "Routing decisions by score band",
                (
                    q(
                        "sum by (band, tier) (rate(tollway_route_decisions_total[5m]))",
                        "{{band}} -> {{tier}}",
                    ),
                ),
                "bargauge",
                "reqps",
                "Routed-alias requests by complexity score band and the tier chosen.",
            ),
            Panel(
                "Queue wait p95",
                (q(f"tier:tollway_queue_wait_seconds:p95_rate5m{{{TIER}}}", "{{tier}}"),),
                unit="s",
            ),
            Panel(
                "Most expensive tenants (1 h)",
                (
                    q(
                        f"topk(10, sum by (tenant) (increase({LOADED}{{{TIER}}}[1h])))",
                        "{{tenant}}",
                        instant=True,
                    ),
                ),
                "table",
                "currencyUSD",
            ),
            Panel(
                "Most expensive models (1 h)",
                (
                    q(
                        f"topk(10, sum by (model, tier) "
                        f"(increase(tollway_cost_loaded_usd_total{{{TENANT}}}[1h])))",
                        "{{model}} ({{tier}})",
                        instant=True,
                    ),
                ),
                "table",
                "currencyUSD",
            ),
            Panel(
                "Tokens computed by kind",
                (
                    q(
                        "sum by (tier, kind) "
                        f'(rate(tollway_tokens_total{{{TIER},cache=~"miss|bypass"}}[5m]))',
                        "{{tier}} {{kind}}",
                    ),
                ),
                description="Tokens the GPUs produced (cache hits and replays left out).",
            ),
            Panel(
                "GPU-seconds per upstream request",
                (
                    q(
                        f"sum by (tier) (rate(tollway_gpu_seconds_total{{{TIER}}}[5m])) / "
                        f"sum by (tier) (rate(tollway_upstream_requests_total{{{TIER}}}[5m]))",
                        "{{tier}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Requests by cache result",
                (
                    q(
                        f"sum by (tier, cache) (rate(tollway_requests_total{{{TIER}}}[5m]))",
                        "{{tier}} {{cache}}",
                    ),
                ),
                unit="reqps",
            ),
        ],
    )


def all_dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON model."""
    return {
        "executive.json": dashboard_json(executive()),
        "oncall.json": dashboard_json(on_call()),
        "debug.json": dashboard_json(debug()),
    }


def render(model: dict[str, Any]) -> str:
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, model in all_dashboards().items():
        (OUT / name).write_text(render(model))
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
