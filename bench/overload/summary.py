"""bench/overload's results: per run goodput, TTFT and shedding; medians per path; the table.

Definitions (the README says why):

- *offered*: requests sent / the arrival window;
- *completed/s*: ok requests that *ended within* the window / the window: what
  the tier served while overloaded;
- *goodput*: of those, the ones whose TTFT met the SLO / the window;
- *SLO met*: ok requests whose TTFT met the SLO, whenever they ended, as a
  share of the requests sent;
- TTFT percentiles are over ok requests only; every request counts in
  exactly one of ok, shed (429), error, unfinished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.lib.report import markdown_table, median
from bench.overload.records import LoadResult, Record

TARGETS = ("direct", "gateway")
SLOW_SHED_S = 1.0  # a 429 this late waited in the queue, it was not refused on arrival


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Capacity:
    """The tier measured with a closed loop at exactly its slot count."""

    concurrency: int
    completed: int
    mean_duration_s: float
    window_rps: float  # completions that ended within the window / the window

    @property
    def rps(self) -> float:
        """Slots / mean request duration: the rate the tier sustains when always full."""
        return self.concurrency / self.mean_duration_s


def capacity(result: LoadResult, concurrency: int) -> Capacity:
    ok = [r for r in result.records if r.kind == "ok" and r.total_s is not None]
    if not ok:
        raise ValueError("no request completed in the capacity run")
    mean = sum(r.total_s or 0.0 for r in ok) / len(ok)
    in_window = sum(1 for r in ok if _ended_by(r, result.duration_s))
    return Capacity(concurrency, len(ok), mean, in_window / result.duration_s)


@dataclass(frozen=True)
class Run:
    """One open-loop run of one path, with what was watched around it."""

    target: str
    repeat: int
    load: LoadResult
    sim_max_waiting: int  # the simulator's own peak (``/sim/stats``), exact
    load_core_busy: float  # whole core (load generator + simulator) during the window
    gateway_cpu_s: float | None  # the gateway process over the window


@dataclass(frozen=True)
class Stats:
    target: str
    offered_rps: float
    completed_rps: float
    goodput_rps: float
    slo_met_share: float
    ok: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    shed: int
    shed_p50_ms: float | None
    shed_p99_ms: float | None
    shed_slow: int  # 429s that took SLOW_SHED_S or more
    errors: int
    unfinished: int
    sim_max_waiting: float
    gateway_max_queue: float | None


def run_stats(run: Run, slo_s: float) -> Stats:
    records = run.load.records
    window = run.load.duration_s
    ok = [r for r in records if r.kind == "ok"]
    good = met_slo(records, slo_s)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    shed = [r.total_s for r in records if r.kind == "shed" and r.total_s is not None]
    shed_ms = [t * 1000 for t in shed]
    queue = run.load.watch_max.get("gateway_queue") if run.target == "gateway" else None
    return Stats(
        target=run.target,
        offered_rps=len(records) / window,
        completed_rps=sum(1 for r in ok if _ended_by(r, window)) / window,
        goodput_rps=sum(1 for r in good if _ended_by(r, window)) / window,
        slo_met_share=len(good) / len(records) if records else 0.0,
        ok=len(ok),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        shed=len(shed),
        shed_p50_ms=percentile(shed_ms, 50),
        shed_p99_ms=percentile(shed_ms, 99),
        shed_slow=sum(1 for t in shed if t >= SLOW_SHED_S),
        errors=_count(records, "error"),
        unfinished=_count(records, "unfinished"),
        sim_max_waiting=run.sim_max_waiting,
        gateway_max_queue=queue,
    )


def met_slo(records: Sequence[Record], slo_s: float) -> list[Record]:
    """Requests answered in full whose first token came within ``slo_s`` of their arrival."""
    return [r for r in records if r.kind == "ok" and r.ttft_s is not None and r.ttft_s <= slo_s]


def _ended_by(record: Record, window: float) -> bool:
    return record.end_s is not None and record.end_s <= window


def medians(stats: Sequence[Stats]) -> list[Stats]:
    """One row per path: the median of each figure over its repeats."""
    rows = []
    for target in TARGETS:
        mine = [s for s in stats if s.target == target]
        if mine:
            rows.append(Stats(target, *(_median(mine, name) for name in _NUMBERS)))  # type: ignore[arg-type]
    return rows


_NUMBERS = [name for name in Stats.__dataclass_fields__ if name != "target"]


def _median(stats: Sequence[Stats], name: str) -> float | None:
    values = [getattr(s, name) for s in stats]
    present = [v for v in values if v is not None]
    return median(present) if present else None


def _count(records: Sequence[Record], kind: str) -> int:
    return sum(1 for r in records if r.kind == kind)


COLUMNS = [
    ("path", "l"), ("offered req/s", "r"), ("completed req/s", "r"), ("goodput req/s", "r"),
    ("SLO met", "r"), ("TTFT p50 s", "r"), ("TTFT p99 s", "r"), ("ok", "r"), ("shed 429", "r"),
    ("429 p50 ms", "r"), ("429 p99 ms", "r"), ("429 after >= 1 s", "r"), ("errors", "r"),
    ("unfinished", "r"),
    ("sim max waiting", "r"), ("gateway max queue", "r"),
]  # fmt: skip


def table(rows: Sequence[Stats]) -> str:
    return markdown_table(COLUMNS, [_cells(row) for row in rows])


def _cells(row: Stats) -> list[str]:
    return [
        "direct to simulator" if row.target == "direct" else "through tollway",
        f"{row.offered_rps:.1f}",
        f"{row.completed_rps:.1f}",
        f"{row.goodput_rps:.1f}",
        f"{100 * row.slo_met_share:.0f}%",
        _num(row.ttft_p50_s, 2),
        _num(row.ttft_p99_s, 2),
        f"{row.ok:.0f}",
        f"{row.shed:.0f}",
        _num(row.shed_p50_ms, 1),
        _num(row.shed_p99_ms, 1),
        f"{row.shed_slow:.0f}",
        f"{row.errors:.0f}",
        f"{row.unfinished:.0f}",
        f"{row.sim_max_waiting:.0f}",
        _num(row.gateway_max_queue, 0),
    ]


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_line(run: Run, stats: Stats) -> str:
    """One run, for the terminal and the collapsed block of RESULTS.md."""
    load = run.load
    cells = dict(zip((title for title, _ in COLUMNS), _cells(stats), strict=True))
    shown = ", ".join(f"{k} {v}" for k, v in cells.items() if k != "path")
    return (
        f"- repeat {run.repeat + 1}, {cells['path']}: {shown}; "
        f"send lag p99 {load.send_lag_p99_s * 1000:.1f} ms (max {load.send_lag_max_s * 1000:.1f}), "
        f"load generator {100 * load.cpu_s / load.duration_s:.0f}% of a core, "
        f"load core {100 * run.load_core_busy:.0f}% busy"
        + (
            f", gateway {100 * run.gateway_cpu_s / load.duration_s:.0f}% of its core"
            if run.gateway_cpu_s is not None
            else ""
        )
    )
