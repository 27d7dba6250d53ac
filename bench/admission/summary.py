"""bench/admission's results: the latency admission adds at one connection against one Redis
round trip, and the throughput with admission on vs off."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.lib.measure import Sample
from bench.lib.report import markdown_table, median

# The goal "about one Redis round trip": the added p50 at most this many round trips,
# a round trip being a PING through the gateway's own Redis client from its core.
ROUND_TRIPS_GOAL = 1.5
ISSUE_RANGE_US = (25, 100)  # the issue's "one round trip on loopback"

# Phases: one connection, one gateway at a time; `connections`, one at a time; both at once.
LATENCY, ALONE, TOGETHER = "latency", "alone", "together"
LABELS = {True: "admission on (budget + rate limits)", False: "admission off"}


@dataclass(frozen=True)
class Run:
    """One gateway's figures from one wrk run: its ``Sample`` (the gateway's CPU over the
    run and the settle after it, so the flush of its releases is charged to it), and
    Redis's over the same window: its CPU and the scripts it ran (EVAL + EVALSHA:
    admissions, releases), None when both gateways were loaded at once (not one gateway's)."""

    phase: str
    round: int
    admission: bool
    sample: Sample
    redis_cpu_s: float | None = None
    evals: int | None = None

    @property
    def requests(self) -> int:
        return self.sample.stats.requests

    @property
    def rps(self) -> float:
        return self.sample.stats.rps

    @property
    def p50_us(self) -> int:
        return self.sample.stats.p50_us

    @property
    def p99_us(self) -> int:
        return self.sample.stats.p99_us

    @property
    def cpu_us(self) -> float:
        return self.sample.gateway_cpu_us_per_request

    @property
    def core_share(self) -> float:
        return self.sample.gateway_busy

    @property
    def redis_us(self) -> float | None:
        return None if self.redis_cpu_s is None else self.redis_cpu_s * 1e6 / self.requests

    @property
    def evals_per_request(self) -> float | None:
        return None if self.evals is None else self.evals / self.requests

    def line(self) -> str:
        redis = ""
        if self.redis_us is not None and self.evals_per_request is not None:
            redis = (
                f", Redis {self.redis_us:.1f} µs CPU/req, {self.evals_per_request:.2f} scripts/req"
            )
        return (
            f"{self.phase} round {self.round + 1}, {LABELS[self.admission]}: "
            f"{self.rps:,.0f} req/s, p50 {self.p50_us} µs, p99 {self.p99_us} µs, gateway "
            f"{self.cpu_us:.0f} µs CPU/req ({100 * self.core_share:.0f}% of its core){redis}"
        )


def rounds(runs: Sequence[Run], phase: str) -> list[tuple[Run, Run]]:
    """(on, off) of each round of ``phase`` that has both, in round order."""
    by_round: dict[int, dict[bool, Run]] = {}
    for run in runs:
        if run.phase == phase:
            by_round.setdefault(run.round, {})[run.admission] = run
    return [(r[True], r[False]) for _, r in sorted(by_round.items()) if len(r) == 2]


def optional(values: Sequence[float | None]) -> float | None:
    """The median of the values, or None if any is missing."""
    known = [v for v in values if v is not None]
    return median(known) if known and len(known) == len(values) else None


def signed(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:+,.{digits}f}"


def plain(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@dataclass(frozen=True)
class Yardstick:
    """Calls timed from the gateway core through the gateway's Redis client, gateways idle."""

    calls: int
    ping_p50_us: float
    ping_p99_us: float
    ping_cpu_us: float  # the caller's CPU per call
    admit_p50_us: float
    admit_p99_us: float
    admit_cpu_us: float


def latency_table(runs: Sequence[Run]) -> str:
    """Each gateway's medians at one connection; then what admission adds: the median of
    the rounds' differences (on minus off)."""
    pairs = rounds(runs, LATENCY)
    cells = []
    for admission in (False, True):
        mine = [pair[0] if admission else pair[1] for pair in pairs]
        cells.append([
            LABELS[admission],
            plain(median([r.p50_us for r in mine])),
            plain(median([r.p99_us for r in mine])),
            plain(median([r.cpu_us for r in mine])),
            plain(optional([r.redis_us for r in mine]), 1),
            plain(optional([r.evals_per_request for r in mine]), 2),
        ])  # fmt: skip
    cells.append([
        "added by admission (median of the rounds' differences)",
        signed(added(pairs, "p50_us")), signed(added(pairs, "p99_us")),
        signed(added(pairs, "cpu_us")), signed(added(pairs, "redis_us"), 1),
        signed(added(pairs, "evals_per_request"), 2),
    ])  # fmt: skip
    columns = [
        ("gateway, 1 connection", "l"), ("p50 µs", "r"), ("p99 µs", "r"),
        ("gateway CPU µs/req", "r"), ("Redis CPU µs/req", "r"), ("Redis scripts/req", "r"),
    ]  # fmt: skip
    return markdown_table(columns, cells)


def added(pairs: Sequence[tuple[Run, Run]], figure: str) -> float | None:
    """The median over the rounds of on minus off of ``figure`` (a ``Run`` attribute);
    None if a round lacks it."""
    diffs: list[float | None] = []
    for on, off in pairs:
        a, b = getattr(on, figure), getattr(off, figure)
        diffs.append(None if a is None or b is None else a - b)
    return optional(diffs)


def yardstick_table(stick: Yardstick) -> str:
    columns = [
        ("call from the gateway core, gateways idle", "l"), ("p50 µs", "r"), ("p99 µs", "r"),
        ("caller CPU µs/call", "r"),
    ]  # fmt: skip
    return markdown_table(
        columns,
        [
            ["PING: one round trip", plain(stick.ping_p50_us), plain(stick.ping_p99_us),
             plain(stick.ping_cpu_us)],
            ["the admission call alone (`SpendCounters.admit`: EVALSHA of ADMIT)",
             plain(stick.admit_p50_us), plain(stick.admit_p99_us), plain(stick.admit_cpu_us)],
        ],
    )  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    measured: str
    met: bool | None  # None: not measured


def round_trip_verdict(runs: Sequence[Run], stick: Yardstick) -> Verdict:
    """The goal: the added p50 is about one round trip (at most ``ROUND_TRIPS_GOAL`` PINGs)."""
    p50 = added(rounds(runs, LATENCY), "p50_us")
    if p50 is None:
        return Verdict("not measured", None)
    trips = p50 / stick.ping_p50_us
    return Verdict(
        f"+{p50:,.0f} µs = {trips:.1f} round trips (PING p50 {stick.ping_p50_us:,.0f} µs; "
        f"the admission call alone {stick.admit_p50_us:,.0f} µs; the issue's loopback round "
        f"trip {ISSUE_RANGE_US[0]}-{ISSUE_RANGE_US[1]} µs)",
        trips <= ROUND_TRIPS_GOAL,
    )


def verdict_table(verdict: Verdict) -> str:
    met = {True: "yes", False: "**no**", None: "-"}[verdict.met]
    goal = f"added p50 at 1 connection <= {ROUND_TRIPS_GOAL:g} Redis round trips"
    return markdown_table(
        [("goal", "l"), ("measured (median of the rounds)", "l"), ("met", "l")],
        [[goal, verdict.measured, met]],
    )


def throughput_table(runs: Sequence[Run], phase: str, title: str) -> str | None:
    """Each gateway's medians in ``phase``; then on / off: the median of the rounds' ratios.
    Redis's CPU per request only where one gateway was loaded at a time."""
    pairs = rounds(runs, phase)
    if not pairs:
        return None
    cells = []
    for admission in (False, True):
        mine = [pair[0] if admission else pair[1] for pair in pairs]
        cells.append([
            LABELS[admission], plain(median([r.rps for r in mine])),
            plain(median([r.cpu_us for r in mine])),
            f"{100 * median([r.core_share for r in mine]):.0f}%",
            plain(optional([r.redis_us for r in mine]), 1),
        ])  # fmt: skip
    rps = [on.rps / off.rps for on, off in pairs]
    cpu = [on.cpu_us / off.cpu_us for on, off in pairs]
    cells.append([
        f"on / off (median of {len(pairs)} rounds: " + ", ".join(f"{r:.3f}" for r in rps) + ")",
        f"{median(rps):.3f}", f"{median(cpu):.3f}", "-", "-",
    ])  # fmt: skip
    columns = [
        (title, "l"), ("requests/s", "r"), ("gateway CPU µs/req", "r"),
        ("gateway % of its core", "r"), ("Redis CPU µs/req", "r"),
    ]  # fmt: skip
    return markdown_table(columns, cells)


# Where admission shows in a py-spy profile of the admission-on gateway: frames on the
# stack, and the event loop's own time (uvloop's C code: epoll, socket reads and writes).
PROFILE_FRAMES = {
    "BudgetGuard.reserve (gateway/budgets.py)": "the reservation, call included",
    "SpendCounters.admit (cache/spend.py)": "its Redis call",
    "SpendCounters.flush (cache/spend.py)": "the flush (releases, spend sums)",
}
EVENT_LOOP = "Runner.run (asyncio/runners.py)"


def profile_shares(collapsed: str) -> list[str]:
    """The share of samples with each of ``PROFILE_FRAMES`` on the stack, and the event
    loop's own, from py-spy's raw output (``frame;frame;... COUNT`` lines)."""
    on_stack = dict.fromkeys(PROFILE_FRAMES, 0)
    loop = total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        loop += int(count) if frames[-1] == EVENT_LOOP else 0
        for frame in on_stack:
            on_stack[frame] += int(count) if frame in frames else 0
    if not total:
        return []
    lines = [f"{100 * n / total:5.1f}%  {PROFILE_FRAMES[f]}: {f}" for f, n in on_stack.items()]
    return [*lines, f"{100 * loop / total:5.1f}%  the event loop's own time: {EVENT_LOOP}"]
