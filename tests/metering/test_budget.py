"""Budgets: UTC windows, and what a budget may be."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from metering.budget import (
    Budget,
    day_reset,
    day_start,
    month_reset,
    month_start,
    utc,
)

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
