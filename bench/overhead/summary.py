"""bench/overhead's results: each run, the medians per scenario and path, and what limited them."""

from __future__ import annotations

from dataclasses import dataclass

from bench.lib.report import markdown_table, median, ms

THROUGHPUT_GOAL_RPS = 2000.0
ADDED_P50_GOAL_MS = 0.6
TARGETS = ("direct", "gateway")


@dataclass(frozen=True)
class Scenario:
    key: str  # "throughput", "latency" or "stream"
    label: str
    connections: int
    stream: bool


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    target: str  # "direct" or "gateway"
    requests: int
    duration_s: float
    p50_us: int
    p99_us: int
    gateway_cpu_s: float | None
    upstream_cpu_s: float
    gateway_core_busy: float  # whole core, every process on it
    load_core_busy: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def gateway_cpu_us_per_request(self) -> float | None:
        if self.gateway_cpu_s is None or not self.requests:
            return None
        return self.gateway_cpu_s * 1e6 / self.requests

    @property
    def gateway_busy(self) -> float | None:
        return None if self.gateway_cpu_s is None else self.gateway_cpu_s / self.duration_s


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    target: str
    rps: float
    p50_us: float
    p99_us: float
    added_p50_us: float | None
    added_p99_us: float | None
    cpu_us: float | None
    busy: float | None
    goal: str
    met: str


def summarise(runs: list[Run], scenarios: list[Scenario]) -> list[Row]:
    rows: list[Row] = []
    for scenario in scenarios:
        medians: dict[str, tuple[float, float, float]] = {}
        for target in TARGETS:
            mine = [r for r in runs if r.scenario == scenario and r.target == target]
            if not mine:
                continue
            rps = median([r.rps for r in mine])
            p50 = median([r.p50_us for r in mine])
            p99 = median([r.p99_us for r in mine])
            medians[target] = (rps, p50, p99)
            cpu = busy = added_p50 = added_p99 = None
            goal = met = "-"
            if target == "gateway":
                cpu = median([r.gateway_cpu_us_per_request or 0.0 for r in mine])
                busy = median([r.gateway_busy or 0.0 for r in mine])
                if "direct" in medians:
                    added_p50 = p50 - medians["direct"][1]
                    added_p99 = p99 - medians["direct"][2]
                if scenario.key == "throughput":
                    goal = f">= {THROUGHPUT_GOAL_RPS:,.0f} req/s"
                    met = "yes" if rps >= THROUGHPUT_GOAL_RPS else "no"
                elif scenario.key == "latency" and added_p50 is not None:
                    goal = f"added p50 <= {ADDED_P50_GOAL_MS} ms"
                    met = "yes" if added_p50 <= ADDED_P50_GOAL_MS * 1000 else "no"
            rows.append(
                Row(scenario, target, rps, p50, p99, added_p50, added_p99, cpu, busy, goal, met)
            )
    return rows


COLUMNS = [
    ("scenario", "l"), ("path", "l"), ("requests/s", "r"), ("p50 ms", "r"), ("p99 ms", "r"),
    ("added p50 ms", "r"), ("added p99 ms", "r"), ("gateway CPU µs/req", "r"),
    ("gateway % of its core", "r"), ("target", "l"), ("met", "l"),
]  # fmt: skip


def table(rows: list[Row]) -> str:
    return markdown_table(
        COLUMNS,
        [
            [
                row.scenario.label,
                row.target,
                f"{row.rps:,.0f}",
                ms(row.p50_us),
                ms(row.p99_us),
                ms(row.added_p50_us, True),
                ms(row.added_p99_us, True),
                "-" if row.cpu_us is None else f"{row.cpu_us:.0f}",
                "-" if row.busy is None else f"{100 * row.busy:.0f}%",
                row.goal,
                row.met,
            ]
            for row in rows
        ],
    )


def progress_line(run: Run, gateway_cpu: int, load_cpu: int) -> str:
    """One run as it finishes, for the terminal."""
    cpu = run.gateway_cpu_us_per_request
    gw_busy = run.gateway_busy
    return (
        f"  {run.scenario.label:<18} {run.target:<8} {run.rps:7.0f} req/s  "
        f"p50 {run.p50_us / 1000:7.3f} ms  p99 {run.p99_us / 1000:7.3f} ms  "
        + (f"gateway {cpu:5.0f} us CPU/req  " if cpu is not None else "")
        + f"cpu{gateway_cpu} {100 * run.gateway_core_busy:3.0f}% busy"
        + (f" (gateway {100 * gw_busy:3.0f}%)" if gw_busy is not None else "")
        + f"  cpu{load_cpu} {100 * run.load_core_busy:3.0f}% busy"
    )


def per_run_lines(runs: list[Run]) -> str:
    lines = []
    for run in runs:
        cpu = run.gateway_cpu_us_per_request
        lines.append(
            f"- {run.scenario.label}, {run.target}: {run.rps:,.0f} req/s, "
            f"p50 {ms(run.p50_us)} ms, p99 {ms(run.p99_us)} ms"
            + (f", gateway {cpu:.0f} µs CPU/req" if cpu is not None else "")
            + f", gateway core {100 * run.gateway_core_busy:.0f}% busy"
            + (f" (gateway {100 * run.gateway_busy:.0f}%)" if run.gateway_busy is not None else "")
            + f", load core {100 * run.load_core_busy:.0f}% busy"
            + f", simulator {run.upstream_cpu_s * 1e6 / run.requests:.0f} µs CPU/req"
        )
    return "\n".join(lines)


def bottleneck_note(
    runs: list[Run], connections: int, gateway_cpu: int, load_cpu: int
) -> str | None:
    """What limited the gateway's throughput runs: the gateway, the load core, or others."""
    mine = [r for r in runs if r.scenario.key == "throughput" and r.target == "gateway"]
    if not mine:
        return None
    gateway = median([r.gateway_busy or 0.0 for r in mine])
    core = median([r.gateway_core_busy for r in mine])
    load = median([r.load_core_busy for r in mine])
    where = (
        f"in the gateway {connections}-conn runs the gateway used {100 * gateway:.0f}% "
        f"of cpu{gateway_cpu} (whole core {100 * core:.0f}% busy), cpu{load_cpu} "
        f"(wrk + simulator) was {100 * load:.0f}% busy"
    )
    if gateway >= 0.9:
        return f"{where}: the gateway's core was the limit, as intended"
    if core - gateway >= 0.1:
        return (
            f"{where}: other processes took {100 * (core - gateway):.0f}% of the gateway's "
            "core; the machine is not quiet, so the gateway's figures are pessimistic"
        )
    if load >= 0.9:
        return (
            f"{where}: the load core was the limit, so the gateway's requests/s is a lower "
            "bound (the direct row shows that core's ceiling)"
        )
    return f"{where}: neither core was saturated; look for another limit"
