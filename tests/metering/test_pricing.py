"""Prices in integer nano-dollars: exact, rounded once half to even, and printed exactly.

The oracle is the same formula in ``Fraction`` (exact rationals: each float's
exact binary value, each Decimal's exact decimal value), rounded half to even
by ``round``: the integer path must agree with it on every input, ties
included, not approximately.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from metering.money import fmt, fmt_nanos, from_nanos, ratio, round_half_even, to_nanos
from metering.pricing import (
    NO_COST,
    Cost,
    GpuTariff,
    TokenPrices,
    idle_millionths,
    price_gpu,
    price_tokens,
)

micros = st.integers(min_value=0, max_value=10**11)  # micro-GPU-seconds, up to ~28 GPU-hours
idle = st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1e3, allow_nan=False))
prices = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)
factors = st.decimals(min_value=1, max_value=3, places=3, allow_nan=False, allow_infinity=False)


def oracle(usd: Fraction) -> int:
    return round(usd * 1_000_000_000)  # Fraction.__round__: half to even


@settings(max_examples=500, deadline=None)
@given(gpu_us=micros, hourly=prices, idle_per_busy=idle, factor=factors)
@example(gpu_us=10**6, hourly=Decimal("0.1185"), idle_per_busy=1.0, factor=Decimal("1.185"))  # tie
def test_gpu_price_is_the_exact_product_rounded_once(
    gpu_us: int, hourly: Decimal, idle_per_busy: float, factor: Decimal
) -> None:
    """The whole micro-GPU-seconds the header prints are what is priced, exactly."""
    cost = price_gpu(gpu_us, ratio(hourly), idle_per_busy, ratio(factor))
    exact = Fraction(gpu_us, 1_000_000) * Fraction(hourly) / 3600
    assert cost.marginal_nanos == oracle(exact)
    idle = Fraction(idle_millionths(idle_per_busy), 1_000_000)
    assert abs(idle - Fraction(idle_per_busy)) <= Fraction(1, 2_000_000)  # priced to millionths
    assert cost.loaded_nanos == oracle(exact * (1 + idle) * Fraction(factor))


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.integers(0, 10**7),
    completion=st.integers(0, 10**7),
    p_in=prices,
    p_out=prices,
    factor=factors,
)
def test_token_price_is_exact(
    prompt: int, completion: int, p_in: Decimal, p_out: Decimal, factor: Decimal
) -> None:
    cost = price_tokens(prompt, completion, TokenPrices(p_in, p_out), ratio(factor))
    marginal = oracle((prompt * Fraction(p_in) + completion * Fraction(p_out)) / 1_000_000)
    assert cost.marginal_nanos == marginal
    # Loaded is the marginal the client saw, times the factor (as before).
    assert cost.loaded_nanos == oracle(Fraction(marginal, 1_000_000_000) * Fraction(factor))


@pytest.mark.parametrize(
    ("num", "den", "want"),
    [(5, 2, 2), (7, 2, 4), (-5, 2, -2), (-7, 2, -4), (1, 3, 0), (2, 3, 1), (-2, 3, -1), (0, 9, 0)],
)
def test_round_half_even(num: int, den: int, want: int) -> None:
    assert round_half_even(num, den) == want


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_fmt_nanos_spells_what_the_decimal_did(nanos: int) -> None:
    assert fmt_nanos(nanos) == fmt(from_nanos(nanos))


def test_cost_keeps_nanos_and_gives_decimals_back() -> None:
    cost = Cost.of_usd(Decimal("0.000091631"), Decimal("0.000142310"))
    assert (cost.marginal_nanos, cost.loaded_nanos) == (91_631, 142_310)
    assert cost.marginal == Decimal("0.000091631")
    assert cost == Cost(91_631, 142_310)
    assert cost != NO_COST
    assert to_nanos(NO_COST.loaded) == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(micros, prices), min_size=1, max_size=200))
def test_sums_of_printed_costs_equal_sums_of_nanos(items: list[tuple[int, Decimal]]) -> None:
    """Finance adds the headers; the ledger and Prometheus add the integers: the same."""
    costs = [price_gpu(us, ratio(h), 0.25, ratio(Decimal("1.25"))) for us, h in items]
    printed = sum(Decimal(fmt_nanos(c.marginal_nanos)) for c in costs)
    assert to_nanos(printed) == sum(c.marginal_nanos for c in costs)


@settings(max_examples=100, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.integers(0, 10**11), st.floats(0, 0.3), idle), min_size=1, max_size=30
    )
)
def test_a_tariff_priced_at_a_time_reads_the_idle_share_at_most_every_fresh_s(
    calls: list[tuple[int, float, float]],
) -> None:
    shares: list[float] = []
    reads: list[float] = []

    def idle_of(now: float) -> float:
        reads.append(now)
        return shares[-1]

    hourly, factor = ratio(Decimal("2.5")), ratio(Decimal("1.25"))
    tariff = GpuTariff(hourly, factor, idle_of, fresh_s=0.1)
    now = 1000.0
    share_read = 0.0
    for gpu_us, step, share in calls:
        now += step
        shares.append(share)
        before = len(reads)
        cost = tariff.price_at(gpu_us, now)
        if len(reads) > before:
            share_read = share
            # not read again within it (stated as the tariff computes it: read + fresh_s;
            # ``now - read`` can differ from it by a rounding, 1000.1 - 1000.0 > 0.1)
            assert len(reads) == 1 or reads[-1] > reads[-2] + 0.1
        else:
            assert now <= reads[-1] + 0.1  # reused only while fresh
        assert cost == price_gpu(gpu_us, hourly, share_read, factor)


@pytest.mark.parametrize(
    ("share", "millionths"),
    [(0.0, 0), (0.25, 250_000), (1e-7, 0), (-1.0, 0), (float("nan"), 0), (float("inf"), 0)],
)
def test_an_idle_share_that_is_not_a_positive_number_prices_as_none(
    share: float, millionths: int
) -> None:
    assert idle_millionths(share) == millionths
    cost = price_gpu(3_600_000_000, ratio(Decimal("2")), share, ratio(Decimal("1.25")))
    assert cost.loaded_nanos == round(2 * 1.25 * 1_000_000_000 * (1 + millionths / 1e6))
