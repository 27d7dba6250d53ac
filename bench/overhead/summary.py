"""bench/overhead's results: each run, the medians per scenario and path, the two targets,
metering on vs off, and what limited the throughput runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.lib.report import markdown_table, median, ms

THROUGHPUT_RATIO_GOAL = 0.6  # tollway's requests/s at 16 connections / the thin proxy's
ADDED_P50_GOAL_MS = 0.75  # tollway's p50 at 1 connection minus the upstream's, called directly

# The paths, in the order a round runs them (reversed every other round).
DIRECT, THIN, TOLLWAY, TOLLWAY_OFF = "direct", "thin", "tollway", "tollway-off"
PATHS = (DIRECT, THIN, TOLLWAY, TOLLWAY_OFF)
LABELS = {
    DIRECT: "direct (upstream)",
    THIN: "thin proxy",
    TOLLWAY: "tollway",
    TOLLWAY_OFF: "tollway, metering off",
}


@dataclass(frozen=True)
class Scenario:
    key: str  # "throughput", "latency" or "stream"
    label: str
    connections: int
    stream: bool


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    path: str  # one of PATHS
    requests: int
    duration_s: float
    p50_us: int
    p99_us: int
    proxy_cpu_s: float | None  # the process in front of the upstream, settle included
    proxy_run_cpu_s: float | None  # the same, while wrk ran; None on the direct path
    upstream_cpu_s: float
    proxy_core_busy: float  # whole core, every process on it
    load_core_busy: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.proxy_cpu_s is None or not self.requests:
            return None
        return self.proxy_cpu_s * 1e6 / self.requests

    @property
    def proxy_busy(self) -> float | None:
        """The proxy's CPU time over wrk's wall time: about 1.0 when it saturates its core."""
        return None if self.proxy_run_cpu_s is None else self.proxy_run_cpu_s / self.duration_s


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    path: str
    rps: float
    p50_us: float
    p99_us: float
    added_p50_us: float | None  # over the direct path
    added_p99_us: float | None
    cpu_us: float | None  # the proxy's CPU per request
    busy: float | None


def summarise(runs: Sequence[Run], scenarios: Sequence[Scenario]) -> list[Row]:
    """Medians per scenario and path, in scenario then path order."""
    rows: list[Row] = []
    for scenario in scenarios:
        direct: tuple[float, float] | None = None
        for path in PATHS:
            mine = [r for r in runs if r.scenario == scenario and r.path == path]
            if not mine:
                continue
            p50 = median([r.p50_us for r in mine])
            p99 = median([r.p99_us for r in mine])
            cpu = busy = added_p50 = added_p99 = None
            if path == DIRECT:
                direct = (p50, p99)
            else:
                cpu = median([r.cpu_us_per_request or 0.0 for r in mine])
                busy = median([r.proxy_busy or 0.0 for r in mine])
                if direct is not None:
                    added_p50, added_p99 = p50 - direct[0], p99 - direct[1]
            rps = median([r.rps for r in mine])
            rows.append(Row(scenario, path, rps, p50, p99, added_p50, added_p99, cpu, busy))
    return rows


def find(rows: Sequence[Row], scenario_key: str, path: str) -> Row | None:
    return next((r for r in rows if r.scenario.key == scenario_key and r.path == path), None)


COLUMNS = [
    ("scenario", "l"), ("path", "l"), ("requests/s", "r"), ("x thin proxy", "r"),
    ("p50 ms", "r"), ("p99 ms", "r"), ("added p50 ms", "r"), ("added p99 ms", "r"),
    ("proxy CPU µs/req", "r"), ("proxy % of its core", "r"),
]  # fmt: skip


def table(rows: Sequence[Row]) -> str:
    """Every scenario and path; "x thin proxy" is requests/s over the thin proxy's."""
    cells = []
    for row in rows:
        thin = find(rows, row.scenario.key, THIN)
        ratio = "-" if thin is None or row.path == THIN else f"{row.rps / thin.rps:.2f}x"
        cells.append(
            [
                row.scenario.label,
                LABELS[row.path],
                f"{row.rps:,.0f}",
                ratio,
                ms(row.p50_us),
                ms(row.p99_us),
                ms(row.added_p50_us, True),
                ms(row.added_p99_us, True),
                "-" if row.cpu_us is None else f"{row.cpu_us:.0f}",
                "-" if row.busy is None else f"{100 * row.busy:.0f}%",
            ]
        )
    return markdown_table(COLUMNS, cells)


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: the run lacks a figure the target needs


def verdicts(rows: Sequence[Row], connections: int) -> list[Verdict]:
    """The two targets, judged on the medians."""
    throughput_target = (
        f"tollway's requests/s at {connections} connections >= "
        f"{THROUGHPUT_RATIO_GOAL:g}x the thin proxy's"
    )
    tollway, thin = find(rows, "throughput", TOLLWAY), find(rows, "throughput", THIN)
    if tollway is None or thin is None:
        out = [Verdict(throughput_target, "not measured", None)]
    else:
        ratio = tollway.rps / thin.rps
        out = [
            Verdict(
                throughput_target,
                f"{ratio:.2f}x ({tollway.rps:,.0f} / {thin.rps:,.0f} req/s)",
                ratio >= THROUGHPUT_RATIO_GOAL,
            )
        ]
    latency_target = f"tollway's added p50 at 1 connection <= {ADDED_P50_GOAL_MS:g} ms"
    latency = find(rows, "latency", TOLLWAY)
    if latency is None or latency.added_p50_us is None:
        out.append(Verdict(latency_target, "not measured", None))
    else:
        out.append(
            Verdict(
                latency_target,
                f"{ms(latency.added_p50_us)} ms ({ms(latency.p50_us)} - "
                f"{ms(latency.p50_us - latency.added_p50_us)} ms direct)",
                latency.added_p50_us <= ADDED_P50_GOAL_MS * 1000,
            )
        )
    return out


def verdict_table(items: Sequence[Verdict]) -> str:
    met = {True: "yes", False: "**no**", None: "-"}
    return markdown_table(
        [("target", "l"), ("measured (medians)", "l"), ("met", "l")],
        [[v.target, v.measured, met[v.met]] for v in items],
    )


def percent(new: float, old: float) -> str:
    return f"{100 * (new - old) / old:+.1f}%" if old else "-"


def metering_table(rows: Sequence[Row], connections: int) -> str | None:
    """Metering on vs off at the throughput load: a figure, not a target."""
    on, off = find(rows, "throughput", TOLLWAY), find(rows, "throughput", TOLLWAY_OFF)
    if on is None or off is None or on.cpu_us is None or off.cpu_us is None:
        return None
    return markdown_table(
        [(f"tollway, {connections} conns", "l"), ("requests/s", "r"), ("CPU µs/req", "r")],
        [
            ["metering on (the default)", f"{on.rps:,.0f}", f"{on.cpu_us:.0f}"],
            ["metering off", f"{off.rps:,.0f}", f"{off.cpu_us:.0f}"],
            ["on vs off", percent(on.rps, off.rps), percent(on.cpu_us, off.cpu_us)],
        ],
    )


def progress_line(run: Run, proxy_cpu: int, load_cpu: int) -> str:
    """One run as it finishes, for the terminal."""
    cpu = run.cpu_us_per_request
    busy = run.proxy_busy
    return (
        f"  {run.scenario.label:<18} {LABELS[run.path]:<22} {run.rps:7.0f} req/s  "
        f"p50 {run.p50_us / 1000:7.3f} ms  p99 {run.p99_us / 1000:7.3f} ms  "
        + (f"proxy {cpu:5.0f} us CPU/req  " if cpu is not None else "")
        + f"cpu{proxy_cpu} {100 * run.proxy_core_busy:3.0f}% busy"
        + (f" (proxy {100 * busy:3.0f}%)" if busy is not None else "")
        + f"  cpu{load_cpu} {100 * run.load_core_busy:3.0f}% busy"
    )


def per_run_lines(runs: Sequence[Run]) -> str:
    lines = []
    for run in runs:
        cpu = run.cpu_us_per_request
        busy = run.proxy_busy
        lines.append(
            f"- {run.scenario.label}, {LABELS[run.path]}: {run.rps:,.0f} req/s, "
            f"p50 {ms(run.p50_us)} ms, p99 {ms(run.p99_us)} ms"
            + (f", proxy {cpu:.0f} µs CPU/req" if cpu is not None else "")
            + f", proxy core {100 * run.proxy_core_busy:.0f}% busy"
            + (f" (proxy {100 * busy:.0f}%)" if busy is not None else "")
            + f", load core {100 * run.load_core_busy:.0f}% busy"
            + f", upstream {run.upstream_cpu_s * 1e6 / run.requests:.0f} µs CPU/req"
        )
    return "\n".join(lines)


def bottleneck_note(
    runs: Sequence[Run], path: str, connections: int, proxy_cpu: int, load_cpu: int
) -> str | None:
    """What limited ``path``'s throughput runs: its own core, the load core, or others."""
    mine = [r for r in runs if r.scenario.key == "throughput" and r.path == path]
    if not mine:
        return None
    own = median([r.proxy_busy or 0.0 for r in mine])
    core = median([r.proxy_core_busy for r in mine])
    load = median([r.load_core_busy for r in mine])
    where = (
        f"{LABELS[path]}, {connections} conns: it used {100 * own:.0f}% of cpu{proxy_cpu} "
        f"(whole core {100 * core:.0f}% busy), cpu{load_cpu} (wrk + upstream) was "
        f"{100 * load:.0f}% busy"
    )
    if own >= 0.9:
        return f"{where}: its own core was the limit, as intended"
    if core - own >= 0.1:
        return (
            f"{where}: other processes took {100 * (core - own):.0f}% of its core; the "
            "machine was not quiet, so its figures are pessimistic"
        )
    if load >= 0.9:
        ratio = ", and tollway's ratio to it an upper bound" if path == THIN else ""
        return (
            f"{where}: the load core was the limit, so its requests/s is a lower bound"
            f"{ratio} (the direct row shows that core's ceiling)"
        )
    return f"{where}: neither core was saturated; look for another limit"
