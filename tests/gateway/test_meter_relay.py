"""``Meter.relay``, the step most answers end in: what ``finish`` and ``head_lines`` give."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import parse_settings
from gateway.meter import Meter, RequestContext
from gateway.pool import Pools, ReplicaState
from gateway.recorder import Recorder
from gateway.schemas import Endpoint
from metering.pricing import Cost
from metering.report import RequestReport
from metering.usage import TokenUsage
from router.table import Decision

URL = "http://127.0.0.1:9"


def meter_on(hourly: float, *, token_prices: bool = False) -> tuple[Meter, ReplicaState, Recorder]:
    tier: dict[str, Any] = {
        "name": "small",
        "models": ["m1"],
        "replicas": [{"url": URL, "gpu_hourly_usd": hourly, "gpus": 2}],
    }
    if token_prices:
        tier["prices"] = {"input_usd_per_mtok": 0.5, "output_usd_per_mtok": 1.5}
    raw = {"auth": {"keys": [{"key": "sk-abcdefgh", "tenant": "t1"}]}, "tiers": [tier]}
    settings = parse_settings(raw, "x.yaml", env={})
    recorder = Recorder([])
    return Meter(settings, recorder=recorder), Pools(settings).by_url[URL], recorder


def context(gpu_seconds: float = 0.25, attempts: int = 1, cache: str = "miss") -> RequestContext:
    ctx = RequestContext("req-1", "t1", Endpoint.CHAT, Decision("small", "m1", True, "short", 0.2))
    ctx.bill.gpu_seconds = gpu_seconds
    ctx.bill.attempts = attempts
    ctx.cache = cache
    return ctx


def timeless(report: RequestReport) -> RequestReport:
    return report._replace(finished_us=0, duration_s=0.0)


@given(
    gpu_seconds=st.floats(0, 1e6) | st.sampled_from([math.nan, math.inf]),
    usage=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6)),
    hourly=st.floats(0, 1e4),
    attempts=st.integers(1, 3),
    cache=st.sampled_from(["miss", "bypass"]),
)
def test_relay_reports_counts_and_spells_what_finish_and_head_lines_do(
    gpu_seconds: float, usage: tuple[int, int, int], hourly: float, attempts: int, cache: str
) -> None:
    meter, replica, recorder = meter_on(hourly)
    tokens = TokenUsage(*usage)
    relayed = meter.relay(context(gpu_seconds, attempts, cache), replica, tokens)
    assert relayed is not None
    report, lines = relayed
    expected = meter.finish(context(gpu_seconds, attempts, cache), replica, tokens, 200)
    assert timeless(report) == timeless(expected)
    assert lines == expected.head_lines()
    assert recorder._pending == [report, expected]  # both queued for counting, once each


class BelowZero:
    """A tariff with a bug: its marginal price is negative."""

    def price_at(self, gpu_us: int, now: float) -> Cost:
        return Cost(-5, 7)


def test_a_price_below_zero_is_spelled_with_its_sign() -> None:
    meter, replica, _ = meter_on(1.0)
    meter._tariffs[replica] = BelowZero()  # type: ignore[assignment]
    relayed = meter.relay(context(), replica, TokenUsage(1, 2))
    assert relayed is not None
    report, lines = relayed
    assert lines == report.head_lines()
    assert b"x-tollway-cost-usd: -0.000000005\r\n" in lines


@pytest.mark.parametrize(("token_prices", "cache"), [(True, "miss"), (False, "hit")])
def test_another_kind_of_answer_is_left_to_finish(token_prices: bool, cache: str) -> None:
    meter, replica, recorder = meter_on(1.0, token_prices=token_prices)
    assert meter.relay(context(cache=cache), replica, TokenUsage(3, 4)) is None
    assert recorder._pending == []
