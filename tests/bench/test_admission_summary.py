"""bench/admission's summary: the added latency against one round trip, on / off ratios, the
profile's shares; and the yardstick's percentiles."""

from __future__ import annotations

from bench.admission.round_trip import percentiles
from bench.admission.summary import (
    ALONE,
    LATENCY,
    TOGETHER,
    Run,
    Yardstick,
    added,
    latency_table,
    profile_shares,
    round_trip_verdict,
    rounds,
    throughput_table,
)
from bench.lib.measure import Sample
from bench.lib.wrk import WrkStats


def run(
    phase: str, round: int, on: bool, rps: float, p50_us: int, cpu_us: float,
    redis_us: float | None = None,
) -> Run:  # fmt: skip
    """A 2 s run at ``rps``; the gateway spent ``cpu_us`` a request, Redis ``redis_us``."""
    requests = int(rps * 2)
    stats = WrkStats(requests, requests, 2_000_000, p50_us, 2 * p50_us, 4 * p50_us,
                     8 * p50_us, p50_us, 10 * p50_us)  # fmt: skip
    sample = Sample(stats, cpu_us * requests / 1e6, 1.0, 0.5, {0: 1.0, 1: 0.5})
    redis = None if redis_us is None else redis_us * requests / 1e6
    evals = None if redis_us is None else (2 if on else 0) * requests
    return Run(phase, round, on, sample, redis, evals)


LATENCY_RUNS = [
    run(LATENCY, 0, False, 500, 2000, 1300, 5), run(LATENCY, 0, True, 400, 2300, 1600, 120),
    run(LATENCY, 1, True, 400, 2500, 1700, 130), run(LATENCY, 1, False, 500, 2100, 1300, 5),
    run(LATENCY, 2, False, 500, 1900, 1200, 5), run(LATENCY, 2, True, 400, 2000, 1500, 110),
]  # fmt: skip
STICK = Yardstick(2000, 250, 400, 200, 400, 900, 300)


def test_rounds_pair_on_and_off_and_skip_a_lone_run() -> None:
    runs = [*LATENCY_RUNS, run(LATENCY, 3, True, 400, 9999, 9999)]
    pairs = rounds(runs, LATENCY)
    assert [(on.round, on.admission, off.admission) for on, off in pairs] == [
        (0, True, False), (1, True, False), (2, True, False),
    ]  # fmt: skip
    assert rounds(runs, TOGETHER) == []


def test_added_is_the_median_of_the_rounds_differences() -> None:
    pairs = rounds(LATENCY_RUNS, LATENCY)
    assert added(pairs, "p50_us") == 300  # 300, 400, 100
    assert added(pairs, "redis_us") == 115
    assert added(pairs, "evals_per_request") == 2
    table = latency_table(LATENCY_RUNS)
    assert "| added by admission (median of the rounds' differences) | +300 | +1,200 |" in table
    assert "| admission off | 2,000 | 8,000 | 1,300 | 5.0 | 0.00 |" in table


def test_a_figure_missing_from_a_round_is_not_guessed() -> None:
    runs = [run(LATENCY, 0, False, 500, 2000, 1300), run(LATENCY, 0, True, 400, 2300, 1600)]
    assert added(rounds(runs, LATENCY), "redis_us") is None
    assert "| +300 | +1,200 | +300 | - | - |" in latency_table(runs)


def test_the_goal_is_about_one_round_trip() -> None:
    verdict = round_trip_verdict(LATENCY_RUNS, STICK)
    assert verdict.met is True  # 300 µs = 1.2 PINGs of 250 µs
    assert verdict.measured.startswith("+300 µs = 1.2 round trips (PING p50 250 µs")
    slow = Yardstick(2000, 150, 400, 140, 300, 900, 250)
    assert round_trip_verdict(LATENCY_RUNS, slow).met is False  # 2.0 round trips
    assert round_trip_verdict([], STICK).met is None


def test_throughput_ratios_per_round() -> None:
    runs = [
        run(TOGETHER, 0, True, 300, 0, 1500), run(TOGETHER, 0, False, 450, 0, 1000),
        run(TOGETHER, 1, True, 320, 0, 1450), run(TOGETHER, 1, False, 480, 0, 1000),
        run(TOGETHER, 2, True, 330, 0, 1400), run(TOGETHER, 2, False, 500, 0, 1000),
    ]  # fmt: skip
    table = throughput_table(runs, TOGETHER, "both")
    assert table is not None
    assert "| on / off (median of 3 rounds: 0.667, 0.667, 0.660) | 0.667 | 1.450 | - | - |" in (
        table
    )
    assert "| admission off | 480 | 1,000 | 50% | - |" in table
    assert throughput_table(runs, ALONE, "alone") is None


def test_profile_shares_count_each_frame_once_per_sample() -> None:
    collapsed = "\n".join([
        "main (x.py);Runner.run (asyncio/runners.py) 50",
        "main (x.py);BudgetGuard.reserve (gateway/budgets.py);"
        "SpendCounters.admit (cache/spend.py) 30",
        "main (x.py);SpendCounters.flush (cache/spend.py) 20",
        "not a sample line",
    ])  # fmt: skip
    shares = profile_shares(collapsed)
    assert shares[0].startswith(" 30.0%  the reservation")
    assert shares[1].startswith(" 30.0%  its Redis call")
    assert shares[2].startswith(" 20.0%  the flush")
    assert shares[3].startswith(" 50.0%  the event loop's own time")
    assert profile_shares("") == []


def test_yardstick_percentiles_are_nearest_rank_in_microseconds() -> None:
    samples = [i * 1000 for i in range(1, 101)]  # 1..100 µs
    assert percentiles(samples) == {"p50_us": 51.0, "p99_us": 100.0}
