"""``Meter.relay``, the step most answers end in: what ``finish`` and ``head_lines`` give.

Every test runs twice: with the C step (``metering.native``) and with the
Python reference alone (as a package built without a C compiler runs).
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gateway.meter
from gateway.config import parse_settings
from gateway.meter import Meter, RequestContext
from gateway.pool import Pools, ReplicaState
from gateway.recorder import Recorder
from gateway.schemas import Endpoint
from metering import native
from metering.pricing import Cost
from metering.report import RequestReport
from metering.usage import TokenUsage
from router.table import Decision

URL = "http://127.0.0.1:9"


@pytest.fixture(autouse=True, params=["native", "reference"])
def relay_step(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native":
        assert native.relay is not None, "metering._relay was not built (needs a C compiler)"
    else:
        monkeypatch.setattr(gateway.meter, "native_relay", None)
    return str(request.param)


def answer(usage: tuple[int, int, int], model: str = "m1", details: bool = True) -> bytes:
    """A chat completion as vLLM spells it (compact JSON, its key order)."""
    prompt, completion, cached = usage
    tokens: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached} if details else None,
    }
    return orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "length"}],
        "usage": tokens, "prompt_logprobs": None, "kv_transfer_params": None,
    })  # fmt: skip


def meter_on(
    hourly: float, *, token_prices: bool = False
) -> tuple[Meter, ReplicaState, list[RequestReport]]:
    """A meter, its replica, and what its recorder hands on at each drain."""
    tier: dict[str, Any] = {
        "name": "small",
        "models": ["m1"],
        "replicas": [{"url": URL, "gpu_hourly_usd": hourly, "gpus": 2}],
    }
    if token_prices:
        tier["prices"] = {"input_usd_per_mtok": 0.5, "output_usd_per_mtok": 1.5}
    raw = {"auth": {"keys": [{"key": "sk-abcdefgh", "tenant": "t1"}]}, "tiers": [tier]}
    settings = parse_settings(raw, "x.yaml", env={})
    counted: list[RequestReport] = []
    recorder = Recorder([counted.extend])
    meter = Meter(settings, recorder=recorder)
    return meter, Pools(settings).by_url[URL], counted


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
    details=st.booleans(),
    hourly=st.floats(0, 1e4),
    attempts=st.integers(1, 3),
    cache=st.sampled_from(["miss", "bypass"]),
    first_token_at=st.none() | st.floats(0, 100),
)
def test_relay_reports_counts_and_spells_what_finish_and_head_lines_do(
    gpu_seconds: float,
    usage: tuple[int, int, int],
    details: bool,
    hourly: float,
    attempts: int,
    cache: str,
    first_token_at: float | None,
) -> None:
    meter, replica, counted = meter_on(hourly)
    tokens = TokenUsage(*usage) if details else TokenUsage(*usage[:2])
    body = answer(usage, details=details)
    contexts = [context(gpu_seconds, attempts, cache) for _ in range(3)]
    for ctx in contexts:
        ctx.started, ctx.first_token_at = contexts[0].started, first_token_at
    kept = meter.relay(contexts[0], replica, body)  # nobody reads the report at once
    given_back = meter.relay(contexts[1], replica, body, report=True)  # budgets read it
    expected = meter.finish(contexts[2], replica, tokens, 200)
    assert kept is not None
    assert given_back is not None
    assert kept[1] == given_back[1] == expected.head_lines()
    report = given_back[0]
    assert report is not None
    assert type(report) is RequestReport
    assert type(report.usage) is TokenUsage
    assert type(report.cost) is Cost
    assert timeless(report) == timeless(expected)
    assert report.ttft_s == expected.ttft_s
    assert meter.recorder is not None
    meter.recorder.drain()
    assert len(counted) == 3  # each queued for counting once, the kept one too
    assert [timeless(r) for r in counted] == [timeless(expected)] * 3
    assert [type(r.usage) for r in counted] == [TokenUsage] * 3


@pytest.mark.parametrize(
    "body",
    [
        answer((1, 2, 0), model="m2"),  # another model's name: read whole, to rename it
        b'{"id":"x","model":"m1","choices":[]}',  # no usage
        b'{"id":"x","model":"m1","choices":[],"usage":null}',
        b'{"id":"x","model":"m1","choices":[],"usage":{"prompt_tokens":1}}',
        b'{"id":"x","model":"m1","usage":{"prompt_tokens":true,"completion_tokens":2}}',
    ],
)
def test_an_answer_without_plain_usage_is_left_to_be_read_whole(body: bytes) -> None:
    meter, replica, counted = meter_on(1.0)
    assert meter.relay(context(), replica, body) is None
    assert meter.recorder is not None
    meter.recorder.drain()
    assert counted == []


def test_the_relayed_time_is_when_the_answer_was_metered() -> None:
    meter, replica, counted = meter_on(1.0)
    before = time.time_ns() // 1000
    assert meter.relay(context(), replica, answer((3, 4, 0))) is not None
    after = time.time_ns() // 1000
    assert meter.recorder is not None
    meter.recorder.drain()
    [report] = counted
    assert before <= report.finished_us <= after
    assert 0 <= report.duration_s < 60


class BelowZero:
    """A tariff with a bug: its marginal price is negative."""

    def rates_at(self, now: float) -> tuple[tuple[int, int], tuple[int, int]]:
        return (-5, 1), (7, 1)

    def price_at(self, gpu_us: int, now: float) -> Cost:
        return Cost(-5, 7)


def test_a_price_below_zero_is_spelled_with_its_sign() -> None:
    meter, replica, _ = meter_on(1.0)
    meter._tariffs[replica] = BelowZero()  # type: ignore[assignment]
    relayed = meter.relay(context(), replica, answer((1, 2, 0)), report=True)
    assert relayed is not None
    report, lines = relayed
    assert report is not None
    assert lines == report.head_lines()
    assert b"x-tollway-cost-usd: -0.000000005\r\n" in lines


@pytest.mark.parametrize(("token_prices", "cache"), [(True, "miss"), (False, "hit")])
def test_another_kind_of_answer_is_left_to_finish(token_prices: bool, cache: str) -> None:
    meter, replica, counted = meter_on(1.0, token_prices=token_prices)
    assert meter.relay(context(cache=cache), replica, answer((3, 4, 0))) is None
    assert meter.recorder is not None
    meter.recorder.drain()
    assert counted == []
