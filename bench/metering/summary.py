"""bench/metering's results: each run, the medians per side, and metering's cost in percent.

Metering's cost is the median over rounds of each round's ratio
``on CPU/req / off CPU/req - 1``: a round is both gateways loaded at once
(mode ``together``) or one run of each back to back (mode ``alternate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bench.lib.measure import Sample
from bench.lib.report import markdown_table, median, ms

TARGET_PCT = 10.0  # metering may add at most this much gateway CPU per request
SIDES = ("on", "off")
Mode = Literal["together", "alternate"]
MODES: tuple[Mode, ...] = ("together", "alternate")
NOISY = "the machine is not quiet, rerun on a quiet one before trusting small differences"
LABELS = {
    "on": "on: Prometheus + OTLP spans + Redis ledger",
    "off": "off: `metering.enabled: false`",
}


@dataclass(frozen=True)
class Run:
    side: str  # "on" or "off"
    repeat: int  # the round; in mode together both sides of a round ran at the same time
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


def round_pcts(runs: list[Run]) -> list[float]:
    """Each complete round's (on - off) / off of gateway CPU per request, in %, in round order."""
    out = []
    for repeat in sorted({r.repeat for r in runs}):
        pair = {r.side: r.sample for r in runs if r.repeat == repeat}
        if set(pair) == set(SIDES):
            on, off = pair["on"], pair["off"]
            out.append(pct(on.gateway_cpu_us_per_request, off.gateway_cpu_us_per_request))
    return out


def overhead_pct(runs: list[Run]) -> float:
    """Metering's cost, the headline: the median of the per-round ratios, in %."""
    return median(round_pcts(runs))


COLUMNS = [
    ("metering", "l"), ("requests/s", "r"), ("p50 ms", "r"), ("p99 ms", "r"),
    ("gateway CPU µs/req", "r"), ("gateway % of its core", "r"), ("target", "l"), ("met", "l"),
]  # fmt: skip


def table(runs: list[Run], gateway_cpu: int, *, judged: bool = True) -> str:
    """The runs' table; ``judged``: the target's load (``run.py``'s defaults), so the
    last row says whether the target is met, else it says nothing of it."""
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
    ratios = round_pcts(runs)
    cost = median(ratios)
    rows.append(
        [
            "metering's cost: (on - off) / off, median of the rounds",
            f"{pct(on.rps, off.rps):+.1f}%",
            ms(on.p50_us - off.p50_us, True),
            ms(on.p99_us - off.p99_us, True),
            f"{cost:+.1f}% ({on.cpu_us - off.cpu_us:+.0f} µs; rounds {min(ratios):+.1f}% "
            f"to {max(ratios):+.1f}%)",
            "-",
            f"CPU/req <= +{TARGET_PCT:.0f}%" if judged else "-",
            ("yes" if cost <= TARGET_PCT else "no") if judged else "-",
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


def round_line(runs: list[Run], repeat: int) -> str:
    """The ratio of one finished round, for the progress output."""
    ratio = round_pcts([r for r in runs if r.repeat == repeat])
    return f"  round {repeat + 1}: on / off - 1 = {ratio[0]:+.1f}% gateway CPU per request"


def per_run_lines(runs: list[Run], gateway_cpu: int, load_cpu: int) -> str:
    return "\n".join(
        f"- round {r.repeat + 1}, {r.side}: {r.sample.stats.rps:,.0f} req/s, "
        f"p50 {ms(r.sample.stats.p50_us)} ms, p99 {ms(r.sample.stats.p99_us)} ms, "
        f"gateway {r.sample.gateway_cpu_us_per_request:.0f} µs CPU/req, "
        f"gateway core {100 * r.sample.core_busy[gateway_cpu]:.0f}% busy "
        f"(gateway {100 * r.sample.gateway_busy:.0f}%), "
        f"load core {100 * r.sample.core_busy[load_cpu]:.0f}% busy"
        for r in runs
    )


def mode_note(mode: Mode, gateway_cpu: int) -> str:
    """What a round was, so the reader knows what the absolute µs/req mean."""
    if mode == "together":
        return (
            f"mode together: in each round both gateways ran at the same time on cpu "
            f"{gateway_cpu}, each under its own wrk (same connections, same duration), so "
            "each had about half the core and host noise hit both alike; absolute µs/req "
            "are higher than a gateway alone gets (two processes share the core's caches), "
            "so compare the ratio, not the µs, with the target and with alternate-mode runs"
        )
    return (
        f"mode alternate: one gateway loaded at a time, each with cpu {gateway_cpu} to "
        "itself, rounds ordered on-off, off-on, ...; host noise between consecutive runs "
        "moves each round's ratio by several %, so small differences are not significant"
    )


def cost_note(runs: list[Run], gateway_cpu: int, *, judged: bool = True) -> str:
    """The headline with its spread: median, min and max of the rounds, medians per side;
    against the target only for the target's load (``judged``, see ``table``)."""
    ratios = round_pcts(runs)
    cost = median(ratios)
    on, off = (side(runs, name, gateway_cpu).cpu_us for name in SIDES)
    verdict = "met" if cost <= TARGET_PCT else "NOT met"
    target = (
        f"target <= +{TARGET_PCT:.0f}%: {verdict}"
        if judged
        else "not the target's load: the target is judged on whole answers of 16 tokens"
    )
    return (
        f"metering's cost in gateway CPU per request: median of {len(ratios)} rounds' "
        f"(on - off) / off {cost:+.1f}% ({target}); "
        f"min {min(ratios):+.1f}%, max {max(ratios):+.1f}%; per round: "
        + ", ".join(f"{p:+.1f}%" for p in ratios)
        + f"; medians per side: on {on:.0f} µs, off {off:.0f} µs per request"
    )


def contention_note(runs: list[Run], gateway_cpu: int, mode: Mode) -> str:
    """Whether other processes shared the gateways' core (CPU per request is then less sure)."""
    if mode == "together":
        return _together_contention(runs, gateway_cpu)
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
            f"{where}: other processes took up to {100 * worst:.0f}% of the gateway's core; {NOISY}"
        )
    return f"{where}: the gateway had its core to itself"


def _together_contention(runs: list[Run], gateway_cpu: int) -> str:
    """The two gateways share the core by design; only the rest of the core's busy time counts."""
    others = []
    for repeat in sorted({r.repeat for r in runs}):
        mine = [r.sample for r in runs if r.repeat == repeat]
        rest = mine[0].core_busy[gateway_cpu] - sum(s.gateway_busy for s in mine)
        others.append(max(0.0, rest))  # jiffy rounding can make it a hair negative
    on, off = side(runs, "on", gateway_cpu), side(runs, "off", gateway_cpu)
    where = (
        f"during the rounds (medians): on gateway {100 * on.busy:.0f}% of cpu{gateway_cpu}, "
        f"off gateway {100 * off.busy:.0f}%, whole core {100 * on.core_busy:.0f}% busy (the "
        f"two gateways share it by design); other processes: median {100 * median(others):.0f}%,"
        f" at most {100 * max(others):.0f}%"
    )
    if max(others) >= 0.1:
        return f"{where}: {NOISY}"
    return f"{where}: nothing else used the core"
