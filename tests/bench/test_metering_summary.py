"""bench/metering's summary: the headline is the median of the per-round ratios."""

from __future__ import annotations

import pytest

from bench.lib.measure import Sample
from bench.lib.wrk import WrkStats
from bench.metering.summary import (
    Run,
    contention_note,
    cost_note,
    overhead_pct,
    round_pcts,
    table,
)

GATEWAY_CPU, LOAD_CPU = 0, 1


def sample(cpu_us_per_request: float, busy: float = 0.5, core_busy: float = 1.0) -> Sample:
    requests = 10_000
    stats = WrkStats(
        requests=requests, sent=requests, duration_us=6_000_000, p50_us=1000, p90_us=1500,
        p99_us=2000, p999_us=3000, mean_us=1100.0, max_us=4000,
    )  # fmt: skip
    return Sample(
        stats=stats,
        gateway_cpu_s=cpu_us_per_request * requests / 1e6,
        gateway_run_cpu_s=busy * stats.duration_s,
        upstream_cpu_s=1.0,
        core_busy={GATEWAY_CPU: core_busy, LOAD_CPU: 0.9},
    )


def rounds(pairs: list[tuple[float, float]], **kwargs: float) -> list[Run]:
    """Runs of rounds with these (on, off) µs per request."""
    runs = []
    for repeat, (on, off) in enumerate(pairs):
        runs += [Run("on", repeat, sample(on, **kwargs)), Run("off", repeat, sample(off, **kwargs))]
    return runs


def test_cost_is_the_median_of_round_ratios_not_the_ratio_of_medians() -> None:
    # Ratios +50%, +10%, +20%: median +20%. Medians per side 300 / 200 would say +50%.
    runs = rounds([(150.0, 100.0), (330.0, 300.0), (300.0, 250.0)])
    assert round_pcts(runs) == pytest.approx([50.0, 10.0, 20.0])
    assert overhead_pct(runs) == pytest.approx(20.0)
    note = cost_note(runs, GATEWAY_CPU)
    assert "+20.0%" in note
    assert "min +10.0%, max +50.0%" in note
    assert "on 300 µs, off 250 µs" in note
    cost_row = table(runs, GATEWAY_CPU).splitlines()[-1]
    assert "+20.0% (+50 µs; rounds +10.0% to +50.0%)" in cost_row
    assert cost_row.endswith("| no |")


def test_another_load_is_measured_but_not_judged_against_the_target() -> None:
    runs = rounds([(105.0, 100.0), (330.0, 300.0)])
    assert "target <= +10%: met" in cost_note(runs, GATEWAY_CPU)
    note = cost_note(runs, GATEWAY_CPU, judged=False)
    assert "+7.5%" in note
    assert "not the target's load" in note
    assert "target <=" not in note
    judged = table(runs, GATEWAY_CPU).splitlines()[-1]
    assert judged.endswith("| CPU/req <= +10% | yes |")
    assert table(runs, GATEWAY_CPU, judged=False).splitlines()[-1].endswith("| - | - |")


def test_an_incomplete_round_is_left_out() -> None:
    runs = [*rounds([(110.0, 100.0)]), Run("on", 1, sample(500.0))]
    assert round_pcts(runs) == pytest.approx([10.0])
    assert table(runs, GATEWAY_CPU).splitlines()[-1].endswith("| yes |")


def test_together_contention_counts_only_what_the_two_gateways_did_not_use() -> None:
    quiet = contention_note(
        rounds([(110.0, 100.0)], busy=0.49, core_busy=1.0), GATEWAY_CPU, "together"
    )
    assert "on gateway 49% of cpu0, off gateway 49%" in quiet
    assert "other processes: median 2%" in quiet
    assert "nothing else used the core" in quiet
    busy = contention_note(
        rounds([(110.0, 100.0)], busy=0.4, core_busy=1.0), GATEWAY_CPU, "together"
    )
    assert "at most 20%" in busy
    assert "not quiet" in busy
