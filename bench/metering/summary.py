"""bench/metering's results: each run, the medians per side, and metering's cost in percent."""

from __future__ import annotations

from dataclasses import dataclass

from bench.lib.measure import Sample
from bench.lib.report import markdown_table, median, ms

TARGET_PCT = 10.0  # metering may add at most this much gateway CPU per request
SIDES = ("on", "off")
LABELS = {
    "on": "on: Prometheus + OTLP spans + Redis ledger",
    "off": "off: `metering.enabled: false`",
}


@dataclass(frozen=True)
class Run:
    side: str  # "on" or "off"
    repeat: int
    sample: Sample


@dataclass(frozen=True)
class Side:
    """Medians of one side's runs."""

    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float
    busy: float
    core_busy: float


def side(runs: list[Run], name: str, gateway_cpu: int) -> Side:
    mine = [r.sample for r in runs if r.side == name]
    return Side(
        rps=median([s.stats.rps for s in mine]),
        p50_us=median([s.stats.p50_us for s in mine]),
        p99_us=median([s.stats.p99_us for s in mine]),
        cpu_us=median([s.gateway_cpu_us_per_request for s in mine]),
        busy=median([s.gateway_busy for s in mine]),
        core_busy=median([s.core_busy[gateway_cpu] for s in mine]),
    )


def pct(new: float, old: float) -> float:
    return 100 * (new - old) / old


def overhead_pct(runs: list[Run], gateway_cpu: int) -> float:
    """Metering's cost: (on - off) / off of the median gateway CPU per request, in %."""
    return pct(side(runs, "on", gateway_cpu).cpu_us, side(runs, "off", gateway_cpu).cpu_us)


def paired_pcts(runs: list[Run]) -> list[float]:
    """The same figure per repeat (on and off of one repeat ran back to back): the spread."""
    out = []
    for repeat in sorted({r.repeat for r in runs}):
        pair = {r.side: r.sample for r in runs if r.repeat == repeat}
        if set(pair) == set(SIDES):
            on, off = pair["on"], pair["off"]
            out.append(pct(on.gateway_cpu_us_per_request, off.gateway_cpu_us_per_request))
    return out


COLUMNS = [
    ("metering", "l"), ("requests/s", "r"), ("p50 ms", "r"), ("p99 ms", "r"),
    ("gateway CPU µs/req", "r"), ("gateway % of its core", "r"), ("target", "l"), ("met", "l"),
]  # fmt: skip


def table(runs: list[Run], gateway_cpu: int) -> str:
    on, off = side(runs, "on", gateway_cpu), side(runs, "off", gateway_cpu)
    rows = [
        [
            LABELS[name],
            f"{s.rps:,.0f}",
            ms(s.p50_us),
            ms(s.p99_us),
            f"{s.cpu_us:.0f}",
            f"{100 * s.busy:.0f}%",
            "-",
            "-",
        ]
        for name, s in (("on", on), ("off", off))
    ]
    cost = pct(on.cpu_us, off.cpu_us)
    rows.append(
        [
            "metering's cost: (on - off) / off",
            f"{pct(on.rps, off.rps):+.1f}%",
            ms(on.p50_us - off.p50_us, True),
            ms(on.p99_us - off.p99_us, True),
            f"{cost:+.1f}% ({on.cpu_us - off.cpu_us:+.0f} µs)",
            "-",
            f"CPU/req <= +{TARGET_PCT:.0f}%",
            "yes" if cost <= TARGET_PCT else "no",
        ]
    )
    return markdown_table(COLUMNS, rows)


def progress_line(run: Run, repeats: int, gateway_cpu: int, load_cpu: int) -> str:
    s = run.sample
    return (
        f"  {run.side:<3} ({run.repeat + 1}/{repeats})  {s.stats.rps:7.0f} req/s  "
        f"p50 {s.stats.p50_us / 1000:7.3f} ms  p99 {s.stats.p99_us / 1000:7.3f} ms  "
        f"gateway {s.gateway_cpu_us_per_request:5.0f} us CPU/req  "
        f"cpu{gateway_cpu} {100 * s.core_busy[gateway_cpu]:3.0f}% busy "
        f"(gateway {100 * s.gateway_busy:3.0f}%)  "
        f"cpu{load_cpu} {100 * s.core_busy[load_cpu]:3.0f}% busy"
    )


def per_run_lines(runs: list[Run], gateway_cpu: int, load_cpu: int) -> str:
    return "\n".join(
        f"- repeat {r.repeat + 1}, {r.side}: {r.sample.stats.rps:,.0f} req/s, "
        f"p50 {ms(r.sample.stats.p50_us)} ms, p99 {ms(r.sample.stats.p99_us)} ms, "
        f"gateway {r.sample.gateway_cpu_us_per_request:.0f} µs CPU/req, "
        f"gateway core {100 * r.sample.core_busy[gateway_cpu]:.0f}% busy "
        f"(gateway {100 * r.sample.gateway_busy:.0f}%), "
        f"load core {100 * r.sample.core_busy[load_cpu]:.0f}% busy"
        for r in runs
    )


def contention_note(runs: list[Run], gateway_cpu: int) -> str:
    """Whether others shared the gateway's core: CPU per request is then less trustworthy."""
    parts = []
    worst = 0.0
    for name in SIDES:
        s = side(runs, name, gateway_cpu)
        worst = max(worst, s.core_busy - s.busy)
        parts.append(
            f"{name}: gateway {100 * s.busy:.0f}% of cpu{gateway_cpu}, "
            f"whole core {100 * s.core_busy:.0f}% busy"
        )
    where = "during the runs (medians) " + "; ".join(parts)
    if worst >= 0.1:
        return (
            f"{where}: other processes took up to {100 * worst:.0f}% of the gateway's core; "
            "the machine is not quiet, rerun on a quiet one before trusting small differences"
        )
    return f"{where}: the gateway had its core to itself"
