"""bench/ledger's summary: medians per gateway, the 10% target, the writer's table, and
reading the gateway's counters from its /metrics."""

from __future__ import annotations

from bench.ledger.summary import (
    ALONE,
    TOGETHER,
    GatewayRun,
    WriterRun,
    gateway_table,
    limit_note,
    metric_total,
    round_ratios,
    summarise,
    verdict,
    writer_table,
)


def run(
    ledger: bool, rps: float, cpu_us: float, *, mode: str = ALONE, round: int = 0,
    busy: float = 0.99,
) -> GatewayRun:  # fmt: skip
    """A 10 s run at ``rps`` whose gateway used ``cpu_us`` per request (PostgreSQL 20 µs)."""
    requests = int(rps * 10)
    cpu = cpu_us * requests / 1e6
    return GatewayRun(mode, round, ledger, requests, 10.0, cpu, busy * 10, requests * 20e-6,
                      1.0, 0.5)  # fmt: skip


ALONE_RUNS = [
    run(True, 1000, 900, round=0), run(False, 1250, 800, round=0),
    run(False, 1000, 800, round=1), run(True, 1200, 800, round=1),
    run(True, 1100, 850, round=2), run(False, 1000, 850, round=2),
]  # fmt: skip


def test_medians_per_gateway_and_the_median_of_the_rounds_ratios() -> None:
    rows = summarise(ALONE_RUNS, ALONE)
    assert rows[True].rps == 1100
    assert abs(rows[True].cpu_us - 850) < 1e-6
    assert rows[True].db_us is not None
    assert abs(rows[True].db_us - 20) < 1e-6
    ratios = round_ratios(ALONE_RUNS, ALONE)
    assert [round(r.rps, 3) for r in ratios] == [0.8, 1.2, 1.1]
    table = gateway_table(rows, ratios)
    assert "| ledger on (database + spool) | 1,100 | 850 | 99% | 20.0 |" in table
    # the median of the rounds' ratios (1.1, 1.0), not the ratio of the medians
    assert "| on vs off (median of the rounds) | +10.0% | +0.0% | - | - |" in table
    assert summarise(ALONE_RUNS, TOGETHER) == {}


def test_together_rounds_pair_by_round_and_skip_a_lone_side() -> None:
    runs = [
        run(True, 480, 1250, mode=TOGETHER, round=0), run(False, 500, 1200, mode=TOGETHER, round=0),
        run(True, 400, 1300, mode=TOGETHER, round=1),
    ]  # fmt: skip
    ratios = round_ratios([*ALONE_RUNS, *runs], TOGETHER)
    assert len(ratios) == 1
    assert abs(ratios[0].rps - 0.96) < 1e-9
    assert abs(ratios[0].cpu - 1250 / 1200) < 1e-9


def test_the_ledger_may_cost_at_most_ten_percent() -> None:
    at_limit = [run(True, 900, 900), run(False, 1000, 800)]
    judged = verdict("both at once", round_ratios(at_limit, ALONE))
    assert judged.met is True
    assert judged.measured == "0.900 (median of 1 rounds: 0.900)"
    missed = [run(True, 899, 900), run(False, 1000, 800)]
    assert verdict("x", round_ratios(missed, ALONE)).met is False
    assert verdict("x", []).met is None


def test_limit_notes_say_who_held_the_cores() -> None:
    rows = summarise([run(True, 1000, 900), run(False, 500, 900, busy=0.5)], ALONE)
    on, off = limit_note(rows, 0, 1)
    assert on.endswith("its own core was the limit, as intended")
    assert off.endswith("other processes took part of its core; not a quiet machine")


def test_writer_table_per_row_figures() -> None:
    e2e = WriterRun("end to end", 10_000, 0.5, 0.4, 0.2, None, None, 0.1)
    alone = WriterRun("insert, 5,000 rows", 10_000, 0.4, 0.2, 0.2, 2, 200.0, None)
    assert e2e.rows_per_s == 20_000
    table = writer_table([e2e, alone])
    assert "| end to end | 10,000 | 0.50 | 20,000 | - | 40.0 | 20.0 |" in table
    assert "| insert, 5,000 rows | 10,000 | 0.40 | 25,000 | 200.0 | 20.0 | 20.0 |" in table


EXPOSITION = """\
# HELP tollway_requests_total Finished client requests.
# TYPE tollway_requests_total counter
tollway_requests_total{tier="bench",model="m",tenant="a b",status="200",cache="miss"} 41.0
tollway_requests_total{tier="bench",model="m",tenant="a",status="499",cache="miss"} 2.0
tollway_requests_total_created{tier="bench",model="m",tenant="a",status="200"} 1.7e+09
tollway_ledger_spool_rows 0.0
tollway_ledger_rows_written_total 43.0
"""


def test_metric_total_sums_every_label_set_of_one_name() -> None:
    assert metric_total(EXPOSITION, "tollway_requests_total") == 43
    assert metric_total(EXPOSITION, "tollway_ledger_rows_written_total") == 43
    assert metric_total(EXPOSITION, "tollway_ledger_spool_rows") == 0
    assert metric_total(EXPOSITION, "tollway_missing_total") == 0
