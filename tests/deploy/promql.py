"""What the deploy tests need to know about PromQL, the rule files and the dashboards.

Metric names in a query are found by pattern (the gateway's ``tollway_*``,
vLLM's ``vllm:*``, recorded ``level:metric:ops`` names); a recorded name
expands to the raw metrics of its rule, so a panel on a recorded series is
known to depend on the metrics behind it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROMETHEUS_PY = ROOT / "metering" / "prometheus.py"

NAME = re.compile(r"(?<![\w:])((?:[a-z_]+:)?tollway[_:][a-z0-9_:]*[a-z0-9]|vllm:[a-z_]+|up)\b")
# Grafana's "All" value for the tier and tenant variables (allValue in the dashboards).
VARIABLES = {"$tier": ".*", "$tenant": ".*"}


@dataclass(frozen=True)
class Rule:
    name: str  # record or alert name
    expr: str
    alert: bool
    labels: dict[str, str]
    annotations: dict[str, str]


def rules(*files: Path) -> list[Rule]:
    out = []
    for path in files or sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for r in group["rules"]:
                out.append(
                    Rule(
                        r.get("record") or r["alert"],
                        r["expr"],
                        "alert" in r,
                        r.get("labels", {}),
                        r.get("annotations", {}),
                    )
                )
    return out


def metric_names(expr: str) -> set[str]:
    return set(NAME.findall(expr))


def raw_metrics(expr: str, recorded: dict[str, str] | None = None) -> set[str]:
    """The exported metrics ``expr`` reads, through any recorded series."""
    if recorded is None:
        recorded = {r.name: r.expr for r in rules() if not r.alert}
    out: set[str] = set()
    for name in metric_names(expr):
        if name in recorded:
            out |= raw_metrics(recorded[name], recorded)
        else:
            out.add(name)
    return out


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard}: {self.panel} [{self.ref}]"

    def resolved(self) -> str:
        expr = self.expr
        for var, value in VARIABLES.items():
            expr = expr.replace(var, value)
        return expr


def panel_queries() -> Iterator[PanelQuery]:
    for name, dash in dashboards().items():
        for panel in dash["panels"]:
            for target in panel["targets"]:
                yield PanelQuery(name, panel["title"], target["refId"], target["expr"])
