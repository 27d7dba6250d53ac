"""bench/cachehit's results: each run, the medians per scenario and path, the targets."""

from __future__ import annotations

from dataclasses import dataclass

from bench.lib.measure import Sample
from bench.lib.report import markdown_table, median, ms

THROUGHPUT_GOAL_RPS = 4000.0  # cache hits through the gateway, one core, 16 connections
P50_GOAL_MS = 0.4  # a cache hit's p50 latency at 1 connection, as the client sees it
PATHS = ("direct", "gateway")


@dataclass(frozen=True)
class Scenario:
    key: str  # "throughput" or "latency"
    label: str
    connections: int


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    path: str  # "direct" (the simulator, for reference) or "gateway" (cache hits)
    sample: Sample
    redis_cpu_s: float
    upstream_requests: int  # what the simulator received during the run

    @property
    def rps(self) -> float:
        return self.sample.stats.rps

    @property
    def redis_cpu_us_per_request(self) -> float:
        return self.redis_cpu_s * 1e6 / self.sample.stats.requests


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    path: str
    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float | None  # the gateway's, per request
    busy: float | None  # the gateway's CPU time over wall time
    redis_us: float | None
    goal: str
    met: str


def summarise(runs: list[Run], scenarios: list[Scenario]) -> list[Row]:
    """Gateway rows first (they carry the targets), then the direct reference rows."""
    rows: list[Row] = []
    for path in PATHS[::-1]:
        for scenario in scenarios:
            mine = [r for r in runs if r.scenario == scenario and r.path == path]
            if not mine:
                continue
            rps = median([r.rps for r in mine])
            p50 = median([r.sample.stats.p50_us for r in mine])
            p99 = median([r.sample.stats.p99_us for r in mine])
            cpu = busy = redis = None
            goal = met = "-"
            if path == "gateway":
                cpu = median([r.sample.gateway_cpu_us_per_request for r in mine])
                busy = median([r.sample.gateway_busy for r in mine])
                redis = median([r.redis_cpu_us_per_request for r in mine])
                if scenario.key == "throughput":
                    goal = f">= {THROUGHPUT_GOAL_RPS:,.0f} req/s"
                    met = "yes" if rps >= THROUGHPUT_GOAL_RPS else "no"
                else:
                    goal = f"p50 <= {P50_GOAL_MS} ms"
                    met = "yes" if p50 <= P50_GOAL_MS * 1000 else "no"
            rows.append(Row(scenario, path, rps, p50, p99, cpu, busy, redis, goal, met))
    return rows


COLUMNS = [
    ("scenario", "l"), ("path", "l"), ("requests/s", "r"), ("p50 ms", "r"), ("p99 ms", "r"),
    ("gateway CPU µs/req", "r"), ("gateway % of its core", "r"), ("Redis CPU µs/req", "r"),
    ("target", "l"), ("met", "l"),
]  # fmt: skip


def path_label(path: str) -> str:
    return "gateway, cache hit" if path == "gateway" else "direct (simulator)"


def table(rows: list[Row]) -> str:
    return markdown_table(
        COLUMNS,
        [
            [
                row.scenario.label,
                path_label(row.path),
                f"{row.rps:,.0f}",
                ms(row.p50_us),
                ms(row.p99_us),
                "-" if row.cpu_us is None else f"{row.cpu_us:.0f}",
                "-" if row.busy is None else f"{100 * row.busy:.0f}%",
                "-" if row.redis_us is None else f"{row.redis_us:.0f}",
                row.goal,
                row.met,
            ]
            for row in rows
        ],
    )


def missed(rows: list[Row]) -> list[str]:
    """The targets not met, one phrase each."""
    return [f"{row.scenario.label}: {row.goal}" for row in rows if row.met == "no"]


def progress_line(run: Run, gateway_cpu: int, load_cpu: int) -> str:
    """One run as it finishes, for the terminal."""
    s = run.sample
    gateway = run.path == "gateway"
    return (
        f"  {run.scenario.label:<9} {run.path:<8} {run.rps:7.0f} req/s  "
        f"p50 {s.stats.p50_us / 1000:7.3f} ms  p99 {s.stats.p99_us / 1000:7.3f} ms  "
        + (f"gateway {s.gateway_cpu_us_per_request:4.0f} us CPU/req  " if gateway else "")
        + f"cpu{gateway_cpu} {100 * s.core_busy[gateway_cpu]:3.0f}% busy"
        + f" (gateway {100 * s.gateway_busy:3.0f}%)"
        + f"  cpu{load_cpu} {100 * s.core_busy[load_cpu]:3.0f}% busy"
        + f"  upstream saw {run.upstream_requests}"
    )


def per_run_lines(runs: list[Run], gateway_cpu: int, load_cpu: int) -> str:
    lines = []
    for run in runs:
        s = run.sample
        gateway = run.path == "gateway"
        lines.append(
            f"- {run.scenario.label}, {path_label(run.path)}: {run.rps:,.0f} req/s, "
            f"p50 {ms(s.stats.p50_us)} ms, p99 {ms(s.stats.p99_us)} ms"
            + (f", gateway {s.gateway_cpu_us_per_request:.0f} µs CPU/req" if gateway else "")
            + f", cpu{gateway_cpu} {100 * s.core_busy[gateway_cpu]:.0f}% busy"
            + f" (gateway {100 * s.gateway_busy:.0f}%)"
            + f", cpu{load_cpu} {100 * s.core_busy[load_cpu]:.0f}% busy"
            + (f", Redis {run.redis_cpu_us_per_request:.0f} µs CPU/req" if gateway else "")
            + f", {s.stats.requests:,} requests, the simulator received {run.upstream_requests:,}"
        )
    return "\n".join(lines)


def bottleneck_note(
    runs: list[Run], connections: int, gateway_cpu: int, load_cpu: int
) -> str | None:
    """What limited the gateway's throughput runs: the gateway, the load core, or others."""
    mine = [r for r in runs if r.scenario.key == "throughput" and r.path == "gateway"]
    if not mine:
        return None
    gateway = median([r.sample.gateway_busy for r in mine])
    core = median([r.sample.core_busy[gateway_cpu] for r in mine])
    load = median([r.sample.core_busy[load_cpu] for r in mine])
    where = (
        f"in the gateway {connections}-conn runs the gateway used {100 * gateway:.0f}% "
        f"of cpu{gateway_cpu} (whole core {100 * core:.0f}% busy), cpu{load_cpu} "
        f"(wrk + Redis; the simulator idle) was {100 * load:.0f}% busy"
    )
    if gateway >= 0.9:
        return f"{where}: the gateway's core was the limit, as intended"
    if core - gateway >= 0.1:
        return (
            f"{where}: other processes took {100 * (core - gateway):.0f}% of the gateway's "
            "core; the machine is not quiet, so the gateway's figures are pessimistic"
        )
    if load >= 0.9:
        return f"{where}: the load core was the limit, so the gateway's requests/s is a lower bound"
    return f"{where}: neither core was saturated; look for another limit (Redis round trips?)"


def quiet_note(runs: list[Run], gateway_cpu: int) -> str | None:
    """Outside load on the gateway's core, seen in the direct runs (the gateway idle there)."""
    mine = [r for r in runs if r.path == "direct"]
    if not mine:
        return None
    core = median([r.sample.core_busy[gateway_cpu] for r in mine])
    gateway = median([r.sample.gateway_busy for r in mine])
    where = (
        f"in the direct runs cpu{gateway_cpu} (nothing pinned there but the idle gateway) "
        f"was {100 * core:.0f}% busy, the gateway {100 * gateway:.0f}%"
    )
    if core - gateway >= 0.1:
        return (
            f"{where}: other processes were running, so the machine was not quiet and the "
            "gateway's figures may be pessimistic"
        )
    return f"{where}: the machine was quiet"
