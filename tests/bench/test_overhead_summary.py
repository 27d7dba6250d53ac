"""bench/overhead's summary: medians per path, the two verdicts, metering on vs off."""

from __future__ import annotations

from bench.overhead.summary import (
    DIRECT,
    THIN,
    TOLLWAY,
    TOLLWAY_OFF,
    Run,
    Scenario,
    metering_table,
    summarise,
    table,
    verdicts,
)

THROUGHPUT = Scenario("throughput", "16 conns", 16, False)
LATENCY = Scenario("latency", "1 conn", 1, False)


def run(scenario: Scenario, path: str, rps: float, p50_us: int, cpu_us: float) -> Run:
    """A 10 s run at ``rps`` whose proxy used ``cpu_us`` per request (none on the direct path)."""
    requests = int(rps * 10)
    cpu = None if path == DIRECT else cpu_us * requests / 1e6
    return Run(scenario, path, requests, 10.0, p50_us, 2 * p50_us, cpu, cpu, 1.0, 1.0, 0.5)


RUNS = [
    run(THROUGHPUT, DIRECT, 4000, 3000, 0),
    run(THROUGHPUT, THIN, 3000, 5000, 300),
    run(THROUGHPUT, TOLLWAY, 2000, 8000, 500),
    run(THROUGHPUT, TOLLWAY, 1600, 9000, 600),  # medians of two: 1,800 req/s, 550 µs
    run(THROUGHPUT, TOLLWAY_OFF, 2000, 8000, 500),
    run(LATENCY, DIRECT, 4000, 200, 0),
    run(LATENCY, THIN, 2000, 450, 300),
    run(LATENCY, TOLLWAY, 1000, 900, 700),
]


def test_medians_and_added_latency_per_path() -> None:
    rows = summarise(RUNS, [THROUGHPUT, LATENCY])
    assert [(r.scenario.key, r.path) for r in rows] == [
        ("throughput", DIRECT), ("throughput", THIN), ("throughput", TOLLWAY),
        ("throughput", TOLLWAY_OFF), ("latency", DIRECT), ("latency", THIN),
        ("latency", TOLLWAY),
    ]  # fmt: skip
    tollway = rows[2]
    assert tollway.rps == 1800
    assert tollway.p50_us == 8500
    assert tollway.added_p50_us == 5500
    assert tollway.cpu_us is not None
    assert abs(tollway.cpu_us - 550) < 1e-6
    assert rows[0].cpu_us is None
    assert rows[0].added_p50_us is None
    assert "| 16 conns | tollway | 1,800 | 0.60x |" in table(rows)


def test_verdicts_against_the_thin_proxy_and_the_direct_path() -> None:
    throughput, latency = verdicts(summarise(RUNS, [THROUGHPUT, LATENCY]), 16)
    assert throughput.met is True
    assert throughput.measured.startswith("0.60x")
    assert latency.met is True
    assert latency.measured.startswith("0.700 ms")
    slower = [*RUNS[:-1], run(LATENCY, TOLLWAY, 1000, 1000, 700)]
    assert verdicts(summarise(slower, [THROUGHPUT, LATENCY]), 16)[1].met is False


def test_a_missing_path_gives_no_verdict() -> None:
    only = [r for r in RUNS if r.path != THIN]
    throughput, _ = verdicts(summarise(only, [THROUGHPUT, LATENCY]), 16)
    assert throughput.met is None


def test_metering_on_vs_off_in_percent() -> None:
    text = metering_table(summarise(RUNS, [THROUGHPUT]), 16)
    assert text is not None
    assert "| on vs off | -10.0% | +10.0% |" in text
    assert metering_table(summarise(RUNS[:3], [THROUGHPUT]), 16) is None
