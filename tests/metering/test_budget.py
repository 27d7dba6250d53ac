"""Budgets: UTC windows, the check (exceeded, remaining, resets_at) and the local spend view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from metering.budget import (
    REMAINING_HEADER,
    Budget,
    SpendTracker,
    budget_amount,
    day_reset,
    day_start,
    month_reset,
    month_start,
    utc,
)
from metering.pricing import Cost

D = Decimal


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# -- windows -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "start", "reset"),
    [
        (at(2026, 11, 22, 17, 30), at(2026, 11, 22), at(2026, 11, 23)),
        (at(2026, 11, 22), at(2026, 11, 22), at(2026, 11, 23)),
        (at(2026, 11, 30, 23, 59, 59), at(2026, 11, 30), at(2026, 12, 1)),
        (at(2026, 12, 31, 23, 59), at(2026, 12, 31), at(2027, 1, 1)),
        (at(2028, 2, 28, 12), at(2028, 2, 28), at(2028, 2, 29)),
    ],
)
def test_day_window(now: datetime, start: datetime, reset: datetime) -> None:
    assert day_start(now) == start
    assert day_reset(now) == reset


@pytest.mark.parametrize(
    ("now", "start", "reset"),
    [
        (at(2026, 11, 22, 17), at(2026, 11, 1), at(2026, 12, 1)),
        (at(2026, 12, 31, 23, 59), at(2026, 12, 1), at(2027, 1, 1)),  # Dec -> Jan
        (at(2027, 1, 1), at(2027, 1, 1), at(2027, 2, 1)),
        (at(2027, 2, 15), at(2027, 2, 1), at(2027, 3, 1)),  # 28 days
        (at(2028, 2, 29, 23), at(2028, 2, 1), at(2028, 3, 1)),  # leap year
        (at(2026, 4, 30, 23, 59, 59), at(2026, 4, 1), at(2026, 5, 1)),  # 30 days
        (at(2026, 1, 31, 12), at(2026, 1, 1), at(2026, 2, 1)),  # 31 days
    ],
)
def test_month_window(now: datetime, start: datetime, reset: datetime) -> None:
    assert month_start(now) == start
    assert month_reset(now) == reset


def test_windows_are_utc_whatever_the_zone() -> None:
    # 01:00 on Dec 1 in UTC+2 is still Nov 30 in UTC.
    plus2 = datetime(2026, 12, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert day_start(plus2) == at(2026, 11, 30)
    assert month_reset(plus2) == at(2026, 12, 1)
    assert utc(datetime(2026, 11, 22, 5)) == at(2026, 11, 22, 5)  # naive is UTC


# -- the check ---------------------------------------------------------------

NOW = at(2026, 11, 22, 17, 30)


def test_a_budget_needs_an_amount_and_cannot_be_negative() -> None:
    with pytest.raises(ValueError, match="daily or a monthly"):
        Budget()
    with pytest.raises(ValueError, match="negative"):
        Budget(daily_usd=D(-1))


def test_under_budget_reports_the_tighter_remaining() -> None:
    budget = Budget(daily_usd=D(10), monthly_usd=D(100))
    status = budget.check(D("3.5"), D("95"), NOW)
    assert not status.exceeded
    assert status.budget == "monthly"
    assert status.remaining_usd == D("5")
    assert status.resets_at == at(2026, 12, 1)
    status = budget.check(D("8"), D("20"), NOW)
    assert (status.budget, status.remaining_usd, status.resets_at) == (
        "daily",
        D(2),
        at(2026, 11, 23),
    )
    assert status.headers() == {REMAINING_HEADER: "2.000000000"}


def test_daily_exceeded_resets_at_midnight() -> None:
    status = Budget(daily_usd=D(10), monthly_usd=D(100)).check(D("10.5"), D("50"), NOW)
    assert status.exceeded
    assert status.budget == "daily"
    assert status.remaining_usd == 0  # never negative
    assert status.resets_at == at(2026, 11, 23)
    assert status.retry_after_s(NOW) == 6 * 3600 + 30 * 60
    assert "daily budget of $10.000000000" in status.message()
    assert "2026-11-23T00:00:00Z" in status.message()


def test_reaching_the_limit_exactly_is_over_budget() -> None:
    assert Budget(daily_usd=D(10)).check(D(10), D(10), NOW).exceeded
    assert not Budget(daily_usd=D(10)).check(D("9.999999999"), D(10), NOW).exceeded
    assert Budget(daily_usd=D(0)).check(D(0), D(0), NOW).exceeded


def test_both_exceeded_reports_the_monthly_one() -> None:
    status = Budget(daily_usd=D(10), monthly_usd=D(100)).check(D(12), D(100), NOW)
    assert status.exceeded
    assert status.budget == "monthly"
    assert status.resets_at == at(2026, 12, 1)


def test_monthly_only_in_december_resets_in_january() -> None:
    status = Budget(monthly_usd=D(5)).check(D(0), D(6), at(2026, 12, 31, 23, 59, 59))
    assert status.exceeded
    assert status.resets_at == at(2027, 1, 1)
    assert status.retry_after_s(at(2026, 12, 31, 23, 59, 59)) == 1
    assert status.retry_after_s(at(2027, 1, 1, 0, 0, 1)) == 1  # a stale status still says retry


def test_budgets_count_loaded_cost() -> None:
    assert budget_amount(Cost.of_usd(D("0.1"), D("0.3"))) == D("0.3")


# -- the local spend view ----------------------------------------------------


def test_tracker_adds_and_rolls_over_at_utc_midnight_and_month_start() -> None:
    tracker = SpendTracker()
    assert tracker.spent("acme", NOW) == (D(0), D(0))
    tracker.add("acme", D("1.5"), NOW)
    tracker.add("acme", D("0.5"), NOW + timedelta(hours=1))
    tracker.add("globex", D("9"), NOW)
    assert tracker.spent("acme", NOW) == (D(2), D(2))
    tomorrow = at(2026, 11, 23, 0, 0, 1)
    tracker.add("acme", D(1), tomorrow)
    assert tracker.spent("acme", tomorrow) == (D(1), D(3))
    next_month = at(2026, 12, 1)
    assert tracker.spent("acme", next_month) == (D(0), D(0))
    tracker.add("acme", D(4), at(2027, 1, 1))
    assert tracker.spent("acme", at(2027, 1, 1, 5)) == (D(4), D(4))
    assert tracker.spent("globex", NOW + timedelta(hours=1)) == (D(9), D(9))


def test_refresh_keeps_the_larger_lower_bound() -> None:
    tracker = SpendTracker()
    tracker.add("acme", D(2), NOW)
    # The ledger has not seen our last request yet: keep ours.
    tracker.refresh("acme", D(1), D(30), NOW)
    assert tracker.spent("acme", NOW) == (D(2), D(30))
    # Other replicas spent too: take the ledger's.
    tracker.refresh("acme", D(5), D(33), NOW)
    tracker.add("acme", D(1), NOW)
    assert tracker.spent("acme", NOW) == (D(6), D(34))


def test_a_refresh_for_an_older_window_is_ignored() -> None:
    tracker = SpendTracker()
    tracker.add("acme", D(1), at(2026, 12, 1, 0, 0, 1))
    # Read just before midnight, answered after: yesterday's and last month's totals.
    tracker.refresh("acme", D(50), D(500), at(2026, 11, 30, 23, 59, 59))
    assert tracker.spent("acme", at(2026, 12, 1, 0, 0, 2)) == (D(1), D(1))


def test_a_refresh_for_a_newer_window_rolls_over() -> None:
    tracker = SpendTracker()
    tracker.add("acme", D(7), NOW)
    tracker.refresh("acme", D(1), D(9), at(2026, 11, 23, 0, 1))
    assert tracker.spent("acme", at(2026, 11, 23, 0, 2)) == (D(1), D(9))


def test_tracker_check_and_refresh_claims() -> None:
    tracker = SpendTracker()
    budget = Budget(daily_usd=D(1))
    tracker.add("acme", D(1), NOW)
    assert tracker.check("acme", budget, NOW).exceeded
    assert not tracker.check("acme", budget, at(2026, 11, 23)).exceeded
    assert tracker.claim_refresh("acme", NOW)
    assert not tracker.claim_refresh("acme", NOW + timedelta(seconds=0.5))
    assert tracker.claim_refresh("acme", NOW + timedelta(seconds=1))
    assert tracker.claim_refresh("globex", NOW)
