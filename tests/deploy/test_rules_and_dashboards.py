"""Static checks of deploy/prometheus and deploy/grafana, with promtool and by reading them.

The live test (test_live_prometheus.py) runs every query; these check what a
query run cannot: rule syntax and unit tests (promtool), that every alert has
a test that fires it and one that does not, names, and the dashboards' model.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from deploy.grafana.dashboards import all_dashboards, render
from tests.deploy.promql import (
    DASHBOARDS,
    PROMETHEUS_PY,
    ROOT,
    RULES,
    metric_names,
    panel_queries,
    raw_metrics,
    rules,
)
from tests.support.tools import needs

PROMTOOL = shutil.which("promtool")
needs_promtool = needs(PROMTOOL is not None, "promtool (Debian prometheus)")
TESTS = ROOT / "deploy" / "prometheus" / "tests"


def exported_names() -> set[str]:
    """Sample names the gateway exports, from the table in metering/prometheus.py."""
    doc = PROMETHEUS_PY.read_text()
    table = re.findall(r"^  (\w+)\s+(counter|gauge|histogram)\s", doc, re.M)
    names: set[str] = set()
    for name, kind in table:
        full = f"tollway_{name}"
        names |= (
            {f"{full}_bucket", f"{full}_sum", f"{full}_count"} if kind == "histogram" else {full}
        )
    return names


@needs_promtool
def test_promtool_checks_the_rule_files() -> None:
    files = [*sorted(RULES.glob("*.yml")), TESTS / "constants.yml"]
    result = subprocess.run([PROMTOOL, "check", "rules", *map(str, files)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    files = sorted(TESTS.glob("*_test.yml"))
    assert len(files) >= 3
    result = subprocess.run([PROMTOOL, "test", "rules", *map(str, files)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in TESTS.glob("*_test.yml"):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (fires if case["exp_alerts"] else silent).add(case["alertname"])
    alerts = {r.name for r in rules() if r.alert}
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested staying silent"


def test_alerts_have_severity_and_an_existing_runbook() -> None:
    for rule in (r for r in rules() if r.alert):
        assert rule.labels["severity"] in {"page", "ticket"}, rule.name
        assert (ROOT / rule.annotations["runbook"]).is_file(), rule.name


def test_rules_read_only_exported_recorded_or_pending_metrics() -> None:
    recorded = {r.name for r in rules() if not r.alert}
    known = exported_names() | recorded | {"up"}
    for rule in rules():
        assert metric_names(rule.expr) <= known, rule.name


def test_panels_read_only_exported_recorded_pending_or_vllm_metrics() -> None:
    known = exported_names() | {"up"}
    for query in panel_queries():
        unknown = {m for m in raw_metrics(query.expr) - known if not m.startswith("vllm:")}
        assert not unknown, query.id


def test_the_metric_name_pattern_finds_every_kind_of_name() -> None:
    expr = ('sum(rate(tollway_requests_total{job="tollway-gateway"}[5m])) / '
            "tier:tollway_retry_inflation:rate5m + tollway:budget_usd_per_day "
            "* vllm:num_requests_running and up")  # fmt: skip
    assert metric_names(expr) == {
        "tollway_requests_total",
        "tier:tollway_retry_inflation:rate5m",
        "tollway:budget_usd_per_day",
        "vllm:num_requests_running",
        "up",
    }


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    generated = all_dashboards()
    assert sorted(generated) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for name, model in generated.items():
        assert (DASHBOARDS / name).read_text() == render(model), (
            f"{name} is stale: run python deploy/grafana/dashboards.py"
        )


@pytest.mark.parametrize("name", ["executive.json", "oncall.json", "debug.json"])
def test_dashboard_model_is_valid_for_grafana(name: str) -> None:
    import json

    dash = json.loads((DASHBOARDS / name).read_text())
    assert {"uid", "title", "schemaVersion", "panels", "templating", "time"} <= set(dash)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        assert grid["h"] > 0
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & used, f"{panel['title']} overlaps another panel"
        used |= cells
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"] == panel["datasource"]
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables, f"{panel['title']}: ${var} is not a dashboard variable"


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["uid"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "tollway.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/tollway"
