"""Proof that the "on" gateway really metered and the "off" one did not.

A metering benchmark whose "on" side silently failed open (Redis unreachable,
spans not exported) would measure nothing; so after the runs: Prometheus must
count requests on "on" and none on "off", the ledger must hold "on"'s tenant
and not "off"'s, and the collector must have received spans. Each gateway has
its own tenant, so the ledger tells their rows apart.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from bench.lib import BenchError
from bench.lib.net import http
from bench.lib.stack import Server

FAILURE_COUNTERS = (
    "tollway_redis_failures_total",
    "tollway_ledger_writes_lost_total",
    "tollway_telemetry_failures_total",
)


def metric_sum(exposition: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(gateway: Server) -> str:
    status, _, data = http("GET", f"{gateway.base}/metrics")
    if status != 200:
        raise BenchError(f"{gateway.proc.name}: GET /metrics answered {status}")
    return data.decode()


@dataclass(frozen=True)
class Metered:
    """What the "on" gateway's metering recorded, read back after the runs."""

    prometheus_requests: int
    ledger_requests: int
    failures: dict[str, int]  # FAILURE_COUNTERS, by name

    def failure_note(self) -> str | None:
        failed = {k.removeprefix("tollway_"): v for k, v in self.failures.items() if v}
        if not failed:
            return None
        return (
            f"WARNING: the on gateway counted failures {failed}: some metering work was "
            "skipped, so its cost is understated"
        )


def usage(gateway: Server, key: str, since: dt.datetime) -> dict[str, Any]:
    query = urllib.parse.urlencode(
        {
            "group_by": "tenant",
            "start": since.replace(minute=0, second=0, microsecond=0).isoformat(),
        }
    )
    status, _, data = http("GET", f"{gateway.base}/v1/usage?{query}", key=key)
    if status != 200:
        raise BenchError(f"{gateway.proc.name}: GET /v1/usage answered {status}: {data[:300]!r}")
    body: dict[str, Any] = json.loads(data)
    return body


def check_metered(
    on: Server, off: Server, admin_key: str, tenants: tuple[str, str], since: dt.datetime
) -> Metered:
    """Raise unless "on" metered (Prometheus, ledger) and "off" did not; ``tenants`` = (on, off)."""
    on_metrics = scrape(on)
    counted = int(metric_sum(on_metrics, "tollway_requests_total"))
    if counted <= 0:
        raise BenchError("the on gateway's /metrics shows no tollway_requests_total: not metered")
    off_counted = int(metric_sum(scrape(off), "tollway_requests_total"))
    if off_counted:
        raise BenchError(f"the off gateway counted {off_counted} requests: metering is not off")
    on_tenant, off_tenant = tenants
    deadline = time.monotonic() + 10.0  # the ledger writes in the background
    while True:
        rows = {row["key"]: int(row["requests"]) for row in usage(on, admin_key, since)["data"]}
        if rows.get(on_tenant, 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if rows.get(on_tenant, 0) <= 0:
        raise BenchError(f"the ledger (GET /v1/usage) has no rows for {on_tenant}: {rows}")
    if rows.get(off_tenant, 0):
        raise BenchError(f"the ledger has {rows[off_tenant]} requests of the off gateway's tenant")
    failures = {name: int(metric_sum(on_metrics, name)) for name in FAILURE_COUNTERS}
    return Metered(counted, rows[on_tenant], failures)


def check_spans(spans: dict[str, int]) -> None:
    if spans.get("spans", 0) <= 0:
        raise BenchError(f"the OTLP collector received no spans ({spans}): tracing was not on")
