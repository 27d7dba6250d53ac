"""bench/ledger's results: the batch writer's rows per second, the gateway with its ledger on
vs off (alone on its core, and both at once), the target, and reading the gateway's own
counters from its ``/metrics``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.lib.report import markdown_table, median

LEDGER_RATIO_GOAL = 0.9  # requests/s with the ledger on / off: it may cost at most 10%
LABELS = {True: "ledger on (database + spool)", False: "ledger off (no database)"}
# How the gateways were loaded: one at a time, each with the gateway core to itself, or
# both at once, sharing it (host noise then hits both at the same instants).
ALONE, TOGETHER = "alone", "together"


@dataclass(frozen=True)
class WriterRun:
    """Rows stored in PostgreSQL in one window, and what each side spent on them."""

    label: str
    rows: int
    seconds: float
    client_cpu_s: float  # the gateway's side: this process, all threads
    db_cpu_s: float  # every PostgreSQL process
    statements: int | None  # the insert-alone runs: statements and their median time
    statement_ms: float | None
    record_s: float | None  # end to end: until the last record_many returned

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def client_us_per_row(self) -> float:
        return self.client_cpu_s * 1e6 / self.rows

    @property
    def db_us_per_row(self) -> float:
        return self.db_cpu_s * 1e6 / self.rows

    def progress(self) -> str:
        return (
            f"{self.label}: {self.rows:,} rows in {self.seconds:.2f} s = "
            f"{self.rows_per_s:,.0f} rows/s; CPU/row: gateway {self.client_us_per_row:.1f} µs, "
            f"PostgreSQL {self.db_us_per_row:.1f} µs"
        )


def writer_table(runs: Sequence[WriterRun]) -> str:
    cells = [
        [
            run.label,
            f"{run.rows:,}",
            f"{run.seconds:.2f}",
            f"{run.rows_per_s:,.0f}",
            "-" if run.statement_ms is None else f"{run.statement_ms:.1f}",
            f"{run.client_us_per_row:.1f}",
            f"{run.db_us_per_row:.1f}",
        ]
        for run in runs
    ]
    columns = [
        ("what", "l"), ("rows", "r"), ("seconds", "r"), ("rows/s", "r"),
        ("ms per statement (median)", "r"), ("gateway CPU µs/row", "r"),
        ("PostgreSQL CPU µs/row", "r"),
    ]  # fmt: skip
    return markdown_table(columns, cells)


@dataclass(frozen=True)
class GatewayRun:
    """One gateway's figures from one wrk run (in ``TOGETHER`` mode, one of two at once)."""

    mode: str  # ALONE or TOGETHER
    round: int
    ledger: bool
    requests: int
    duration_s: float
    gateway_cpu_s: float  # settle included, so the ledger's last writes are charged
    gateway_run_cpu_s: float  # while wrk ran
    db_cpu_s: float | None  # every PostgreSQL process, same window; None: not this one's
    gateway_core_busy: float  # whole core, every process on it
    load_core_busy: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def cpu_us(self) -> float:
        return self.gateway_cpu_s * 1e6 / self.requests

    @property
    def db_us(self) -> float | None:
        return None if self.db_cpu_s is None else self.db_cpu_s * 1e6 / self.requests

    @property
    def busy(self) -> float:
        """The gateway's CPU time over wrk's wall time: about 1.0 when it saturates its core."""
        return self.gateway_run_cpu_s / self.duration_s

    def line(self) -> str:
        db = "" if self.db_us is None else f", PostgreSQL {self.db_us:.1f} µs CPU/req"
        return (
            f"{self.mode} round {self.round + 1}, {LABELS[self.ledger]}: {self.rps:,.0f} req/s, "
            f"gateway {self.cpu_us:.0f} µs CPU/req ({100 * self.busy:.0f}% of its core, whole "
            f"core {100 * self.gateway_core_busy:.0f}% busy){db}, load core "
            f"{100 * self.load_core_busy:.0f}% busy"
        )


@dataclass(frozen=True)
class GatewayRow:
    """Medians of one gateway's runs in one mode."""

    ledger: bool
    rps: float
    cpu_us: float
    db_us: float | None
    busy: float
    core_busy: float
    load_busy: float


def summarise(runs: Sequence[GatewayRun], mode: str) -> dict[bool, GatewayRow]:
    """Medians per gateway (ledger on, off) of ``mode``'s runs, for the gateways that have any."""
    rows = {}
    for ledger in (True, False):
        mine = [r for r in runs if r.mode == mode and r.ledger == ledger]
        if not mine:
            continue
        db = [us for us in (r.db_us for r in mine) if us is not None]
        rows[ledger] = GatewayRow(
            ledger,
            median([r.rps for r in mine]),
            median([r.cpu_us for r in mine]),
            median(db) if db else None,
            median([r.busy for r in mine]),
            median([r.gateway_core_busy for r in mine]),
            median([r.load_core_busy for r in mine]),
        )
    return rows


@dataclass(frozen=True)
class Ratio:
    """Ledger on over off in one round: requests/s and CPU per request."""

    rps: float
    cpu: float


def round_ratios(runs: Sequence[GatewayRun], mode: str) -> list[Ratio]:
    """On over off per round of ``mode`` (rounds with both gateways), in round order."""
    pairs: dict[int, dict[bool, GatewayRun]] = {}
    for run in runs:
        if run.mode == mode:
            pairs.setdefault(run.round, {})[run.ledger] = run
    return [
        Ratio(pair[True].rps / pair[False].rps, pair[True].cpu_us / pair[False].cpu_us)
        for _, pair in sorted(pairs.items())
        if len(pair) == 2
    ]


def percent(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def gateway_table(rows: dict[bool, GatewayRow], ratios: Sequence[Ratio]) -> str:
    """Each gateway's medians; then on vs off: the median of the rounds' ratios."""
    columns = [
        ("gateway", "l"), ("requests/s", "r"), ("gateway CPU µs/req", "r"),
        ("gateway % of its core", "r"), ("PostgreSQL CPU µs/req", "r"),
    ]  # fmt: skip
    cells = [
        [LABELS[r.ledger], f"{r.rps:,.0f}", f"{r.cpu_us:.0f}", f"{100 * r.busy:.0f}%",
         "-" if r.db_us is None else f"{r.db_us:.1f}"]
        for r in rows.values()
    ]  # fmt: skip
    if ratios:
        rps = median([r.rps for r in ratios])
        cpu = median([r.cpu for r in ratios])
        cells.append(["on vs off (median of the rounds)", percent(rps), percent(cpu), "-", "-"])
    return markdown_table(columns, cells)


@dataclass(frozen=True)
class Verdict:
    method: str
    measured: str
    met: bool | None  # None: not measured


def verdict(method: str, ratios: Sequence[Ratio]) -> Verdict:
    """The target on the median of the rounds' requests/s ratios, with their spread."""
    if not ratios:
        return Verdict(method, "not measured", None)
    values = [r.rps for r in ratios]
    ratio = median(values)
    return Verdict(
        method,
        f"{ratio:.3f} (median of {len(values)} rounds: "
        + ", ".join(f"{v:.3f}" for v in values)
        + ")",
        ratio >= LEDGER_RATIO_GOAL,
    )


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    met = {True: "yes", False: "**no**", None: "-"}
    return markdown_table(
        [("target", "l"), ("method", "l"), ("measured: on / off requests/s", "l"), ("met", "l")],
        [
            [f"ledger on >= {LEDGER_RATIO_GOAL:g}x ledger off", v.method, v.measured, met[v.met]]
            for v in verdicts
        ],
    )


def limit_note(rows: dict[bool, GatewayRow], gateway_cpu: int, load_cpu: int) -> list[str]:
    """What limited each gateway's runs alone: its own core (intended), the load core, others."""
    notes = []
    for row in rows.values():
        where = (
            f"{LABELS[row.ledger]}, alone: it used {100 * row.busy:.0f}% of cpu{gateway_cpu} "
            f"(whole core {100 * row.core_busy:.0f}% busy), cpu{load_cpu} (wrk, simulator, "
            f"Redis, PostgreSQL) was {100 * row.load_busy:.0f}% busy"
        )
        if row.busy >= 0.9:
            notes.append(f"{where}: its own core was the limit, as intended")
        elif row.core_busy - row.busy >= 0.1:
            notes.append(f"{where}: other processes took part of its core; not a quiet machine")
        elif row.load_busy >= 0.9:
            notes.append(f"{where}: the load core was the limit; its requests/s is a lower bound")
        else:
            notes.append(f"{where}: neither core was saturated; look for another limit")
    return notes


def metric_total(exposition: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in Prometheus text; 0 if none."""
    total = 0.0
    for line in exposition.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name) :]
        if rest[:1] not in ("{", " "):  # another metric whose name starts with this one
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total
