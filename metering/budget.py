"""Budgets' windows and amounts: pure logic, no I/O.

A budget caps a tenant's (or a key's) spend per UTC day, per calendar month,
or both; a budget resets at the end of its window: a day runs from 00:00 to
the next 00:00 UTC, a month from the 1st at 00:00 to the 1st of the next.

**Basis: fully loaded cost.** A budget caps what the tenant will be charged,
and an internal chargeback recovers the loaded figure (the GPUs' idle time
and the overhead are real costs someone pays); budgeting on marginal cost
would let a tenant's bill run past its budget by the idle-and-overhead
factor. The price of this choice: loaded cost depends on the replica's recent
utilisation, so a tenant alone on a quiet replica burns its budget faster than
on a busy one. That is what the tenant is billed, so it is what the budget
watches. Enforcement (reservations held in Redis before a request runs) is
``gateway.budgets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

BudgetName = Literal["daily", "monthly"]
REMAINING_HEADER = "x-tollway-budget-remaining-usd"


def utc(now: datetime) -> datetime:
    """``now`` in UTC; a naive datetime is taken to be UTC already."""
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def day_start(now: datetime) -> datetime:
    now = utc(now)
    return datetime(now.year, now.month, now.day, tzinfo=UTC)


def day_reset(now: datetime) -> datetime:
    return day_start(now) + timedelta(days=1)


def month_start(now: datetime) -> datetime:
    now = utc(now)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def month_reset(now: datetime) -> datetime:
    now = utc(now)
    if now.month == 12:
        return datetime(now.year + 1, 1, 1, tzinfo=UTC)
    return datetime(now.year, now.month + 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Budget:
    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None

    def __post_init__(self) -> None:
        if self.daily_usd is None and self.monthly_usd is None:
            raise ValueError("a budget needs a daily or a monthly amount")
        for amount in (self.daily_usd, self.monthly_usd):
            if amount is not None and amount < 0:
                raise ValueError(f"a budget cannot be negative: {amount}")


@dataclass(frozen=True, slots=True)
class Held:
    """What a request holds against its budgets while it runs (``gateway.budgets``)."""

    tenant: str
    amount_nanos: int
    remaining_nanos: int  # the tightest budget's room once this hold was taken; -1: none
