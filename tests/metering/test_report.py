"""RequestReport: integer figures, and headers that print exactly what is counted."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from metering.pricing import NO_COST
from metering.report import RequestReport, to_micros
from metering.usage import TokenUsage


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_the_gpu_header_prints_the_micro_seconds_that_are_counted(seconds: float) -> None:
    gpu_us = to_micros(seconds)
    assert abs(gpu_us - seconds * 1_000_000) <= 0.5 + 1e-9 * seconds * 1_000_000
    report = RequestReport("r", "t", "small", "m", "chat", gpu_us=gpu_us)
    printed = report.headers()["x-tollway-gpu-seconds"]
    assert int(Decimal(printed) * 1_000_000) == gpu_us
    assert report.gpu_seconds == gpu_us / 1_000_000


def test_a_figure_that_is_not_a_number_becomes_zero_not_an_error() -> None:
    assert to_micros(float("nan")) == 0
    assert to_micros(float("inf")) == 0
    assert to_micros(0.0000004) == 0
    assert to_micros(0.0000006) == 1


def test_only_a_free_answer_reports_a_saving() -> None:
    miss = RequestReport("r", "t", "small", "m", "chat", saved_nanos=0)
    hit = RequestReport(
        "r", "t", "small", "m", "chat", TokenUsage(3, 4), cost=NO_COST, cache="hit",
        saved_nanos=1_250,
    )  # fmt: skip
    assert (miss.saved, hit.saved) == (None, Decimal("0.000001250"))
    assert "x-tollway-cost-saved-usd" not in miss.headers()
    assert hit.headers()["x-tollway-cost-saved-usd"] == "0.000001250"
    assert hit.stream_object()["cost_saved_usd"] == "0.000001250"
    assert miss.stream_object()["cost_saved_usd"] is None
