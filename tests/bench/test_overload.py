"""bench/overload's pure parts: arrivals, SSE and metrics parsing, the summary's arithmetic."""

from __future__ import annotations

import json

import pytest

from bench.overload.loadgen import Watch, arrivals, gauge_value, has_content
from bench.overload.records import LoadResult, Record
from bench.overload.summary import Run, capacity, medians, percentile, run_stats, table


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_arrivals_are_seeded_poisson_within_the_window() -> None:
    times = arrivals(40.0, 50.0, seed=1)
    assert times == arrivals(40.0, 50.0, seed=1)
    assert times != arrivals(40.0, 50.0, seed=2)
    assert times == sorted(times)
    assert times[0] > 0
    assert times[-1] < 50.0
    assert len(times) == pytest.approx(2000, rel=0.1)


def test_has_content_skips_role_usage_and_tollway_chunks() -> None:
    def chunk(**event: object) -> bytes:
        return json.dumps(event).encode()

    assert not has_content(chunk(choices=[{"delta": {"role": "assistant", "content": ""}}]))
    assert has_content(chunk(choices=[{"delta": {"content": " word"}}]))
    assert has_content(chunk(choices=[{"text": "word"}]))  # completions
    assert not has_content(chunk(choices=[], usage={"completion_tokens": 3}))
    assert not has_content(b"not json")


def test_gauge_value_sums_label_sets_and_ignores_longer_names() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_waiting Requests waiting.",
            'vllm:num_requests_waiting{engine="0",model_name="m"} 7.0',
            'vllm:num_requests_waiting{engine="1",model_name="m"} 3.0',
            'vllm:num_requests_waiting_total{engine="0"} 99.0',
            "tollway_queue_depth 4",
        ]
    )
    assert gauge_value(text, "vllm:num_requests_waiting") == 10.0
    assert gauge_value(text, "tollway_queue_depth") == 4.0
    assert gauge_value(text, "absent") is None
    watch = Watch.parse("sim=http://127.0.0.1:1/metrics@vllm:num_requests_waiting")
    assert watch == Watch("sim", "http://127.0.0.1:1/metrics", "vllm:num_requests_waiting")


def _run(target: str, records: list[Record], window: float = 10.0) -> Run:
    load = LoadResult("open", window, records, watch_max={"gateway_queue": 5.0})
    return Run(target, 0, load, sim_max_waiting=2, load_core_busy=0.5, gateway_cpu_s=None)


def test_run_stats_counts_goodput_in_the_window_and_every_outcome() -> None:
    records = [
        Record(at_s=0.0, kind="ok", status=200, ttft_s=0.5, total_s=1.0),  # good, in window
        Record(at_s=8.0, kind="ok", status=200, ttft_s=2.0, total_s=3.0),  # good, ends at 11
        Record(at_s=1.0, kind="ok", status=200, ttft_s=4.0, total_s=5.0),  # too slow
        Record(at_s=2.0, kind="shed", status=429, total_s=0.002, retry_after="1"),
        Record(at_s=3.0, kind="shed", status=429, total_s=2.0, retry_after="1"),
        Record(at_s=4.0, kind="error", status=502, total_s=0.1),
        Record(at_s=5.0),  # unfinished
    ]
    stats = run_stats(_run("gateway", records), slo_s=2.5)
    assert stats.offered_rps == pytest.approx(0.7)
    assert stats.completed_rps == pytest.approx(0.2)  # two ok requests ended by t=10
    assert stats.goodput_rps == pytest.approx(0.1)  # only one of them met the SLO
    assert stats.slo_met_share == pytest.approx(2 / 7)
    assert (stats.ok, stats.shed, stats.errors, stats.unfinished) == (3, 2, 1, 1)
    assert stats.ttft_p50_s == 2.0
    assert stats.ttft_p99_s == 4.0
    assert stats.shed_p50_ms == pytest.approx(2.0)
    assert stats.shed_p99_ms == pytest.approx(2000.0)
    assert stats.shed_slow == 1
    assert stats.gateway_max_queue == 5.0
    assert run_stats(_run("direct", records), slo_s=2.5).gateway_max_queue is None


def test_medians_per_path_and_table_shape() -> None:
    fast = [Record(at_s=0.0, kind="ok", status=200, ttft_s=0.1, total_s=1.0)]
    slow = [Record(at_s=0.0, kind="ok", status=200, ttft_s=9.0, total_s=10.0)]
    stats = [run_stats(_run("direct", r), 2.5) for r in (fast, slow, slow)]
    stats.append(run_stats(_run("gateway", fast), 2.5))
    rows = medians(stats)
    assert [row.target for row in rows] == ["direct", "gateway"]
    assert rows[0].ttft_p50_s == 9.0
    assert rows[1].ttft_p50_s == 0.1
    lines = table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].count("|") == lines[2].count("|") == lines[3].count("|")


def test_capacity_is_slots_over_mean_duration() -> None:
    records = [Record(at_s=0.0, kind="ok", status=200, ttft_s=0.1, total_s=d) for d in (0.5, 1.5)]
    cap = capacity(LoadResult("closed", 1.0, records), concurrency=8)
    assert cap.rps == pytest.approx(8.0)
    assert cap.window_rps == pytest.approx(1.0)


def test_load_result_round_trips_through_json() -> None:
    result = LoadResult("open", 5.0, [Record(at_s=1.0, kind="shed", status=429)], 0.1, 0.2, 0.3)
    assert LoadResult.from_json(json.loads(json.dumps(result.to_json()))) == result
