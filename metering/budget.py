"""Per-tenant USD budgets: their UTC windows, the check, and a local view of spend.

Pure logic, no I/O. A tenant may have a daily budget, a monthly one, or both.
Windows are UTC calendar windows: a day runs from 00:00 to the next 00:00, a
month from the 1st at 00:00 to the 1st of the next month; a budget resets at
the end of its window.

**Basis: fully loaded cost.** A budget caps what the tenant will be charged,
and an internal chargeback recovers the loaded figure (the GPUs' idle time
and the overhead are real costs someone pays); budgeting on marginal cost
would let a tenant's bill run past its budget by the idle-and-overhead
factor. The price of this choice: loaded cost depends on the replica's recent
utilisation, so a tenant alone on a quiet replica burns its budget faster than
on a busy one. That is what the tenant is billed, so it is what the budget
watches. ``budget_amount`` is the one place that picks the basis.

The gateway keeps a ``SpendTracker``: for each budgeted tenant, the spend in
the current day and month, refreshed from the usage ledger about once a
second (``claim_refresh`` says when) plus what this gateway metered since.
Both the ledger's totals and the local sum are lower bounds of the true
spend, so a refresh keeps the larger; the error is bounded by a refresh
interval of the other replicas' spend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Literal

from metering.money import ZERO, fmt, usd
from metering.pricing import Cost

BudgetName = Literal["daily", "monthly"]
REMAINING_HEADER = "x-tollway-budget-remaining-usd"


def budget_amount(cost: Cost) -> Decimal:
    """The figure budgets count: the fully loaded cost (see the module docstring)."""
    return cost.loaded


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
class WindowSpend:
    """A tenant's spend in the current UTC day and month, both bases."""

    day: Cost
    month: Cost


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """The outcome of a check. ``budget`` is the exceeded budget, else the tighter one."""

    exceeded: bool
    budget: BudgetName
    limit_usd: Decimal
    remaining_usd: Decimal  # the smaller remaining of the configured budgets, never negative
    resets_at: datetime  # when ``budget``'s window ends

    def retry_after_s(self, now: datetime) -> int:
        """Whole seconds until the reset, at least 1: the ``Retry-After`` of a 429."""
        return max(1, math.ceil((self.resets_at - utc(now)).total_seconds()))

    def message(self) -> str:
        resets = self.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.exceeded:
            return (
                f"The {self.budget} budget of ${fmt(self.limit_usd)} for this API key's tenant "
                f"is spent; it resets at {resets}."
            )
        return f"${fmt(self.remaining_usd)} left of the {self.budget} budget until {resets}."

    def headers(self) -> dict[str, str]:
        return {REMAINING_HEADER: fmt(self.remaining_usd)}


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

    def check(self, spent_today: Decimal, spent_month: Decimal, now: datetime) -> BudgetStatus:
        """Over budget when spend has reached a limit (a $0 budget admits nothing)."""
        candidates: list[BudgetStatus] = []
        if self.daily_usd is not None:
            candidates.append(_status("daily", self.daily_usd, spent_today, day_reset(now)))
        if self.monthly_usd is not None:
            candidates.append(_status("monthly", self.monthly_usd, spent_month, month_reset(now)))
        exceeded = [s for s in candidates if s.exceeded]
        if exceeded:
            # Both spent: the request can resume only when the later window resets.
            return max(exceeded, key=lambda s: s.resets_at)
        return min(candidates, key=lambda s: s.remaining_usd)


def _status(name: BudgetName, limit: Decimal, spent: Decimal, resets_at: datetime) -> BudgetStatus:
    remaining = usd(max(ZERO, limit - spent))
    return BudgetStatus(spent >= limit, name, usd(limit), remaining, resets_at)


@dataclass(slots=True)
class _TenantSpend:
    day: date
    month: tuple[int, int]
    spent_day: Decimal = ZERO
    spent_month: Decimal = ZERO
    refresh_claimed: datetime | None = None


def _month_of(now: datetime) -> tuple[int, int]:
    return (now.year, now.month)


class SpendTracker:
    """Per-tenant spend in the current UTC day and month, as one gateway sees it.

    ``add`` what this gateway metered; ``refresh`` with the ledger's totals
    (the larger figure wins, both are lower bounds of the truth). A new day or
    month starts from zero. Figures for a window older than the tracked one
    (a late refresh read before midnight) are ignored.
    """

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantSpend] = {}

    def _roll(self, tenant: str, now: datetime) -> _TenantSpend:
        day, month = now.date(), _month_of(now)
        spend = self._tenants.get(tenant)
        if spend is None:
            spend = self._tenants[tenant] = _TenantSpend(day, month)
        if day > spend.day:
            spend.day, spend.spent_day = day, ZERO
        if month > spend.month:
            spend.month, spend.spent_month = month, ZERO
        return spend

    def add(self, tenant: str, amount: Decimal, now: datetime) -> None:
        now = utc(now)
        spend = self._roll(tenant, now)
        if now.date() == spend.day:
            spend.spent_day += amount
        if _month_of(now) == spend.month:
            spend.spent_month += amount

    def refresh(self, tenant: str, day_total: Decimal, month_total: Decimal, now: datetime) -> None:
        """The ledger's totals for the day and month that contain ``now`` (the read's time)."""
        now = utc(now)
        spend = self._roll(tenant, now)
        if now.date() == spend.day:
            spend.spent_day = max(spend.spent_day, day_total)
        if _month_of(now) == spend.month:
            spend.spent_month = max(spend.spent_month, month_total)

    def spent(self, tenant: str, now: datetime) -> tuple[Decimal, Decimal]:
        """(today, this month) as known locally; zero for a tenant never seen."""
        spend = self._roll(tenant, utc(now))
        return spend.spent_day, spend.spent_month

    def check(
        self, tenant: str, budget: Budget, now: datetime, pending: Decimal = ZERO
    ) -> BudgetStatus:
        """The tenant's status now, or once ``pending`` more is spent."""
        day, month = self.spent(tenant, now)
        return budget.check(day + pending, month + pending, now)

    def claim_refresh(self, tenant: str, now: datetime, every_s: float = 1.0) -> bool:
        """True when a refresh from the ledger is due; claims it, so one caller does it."""
        now = utc(now)
        spend = self._roll(tenant, now)
        last = spend.refresh_claimed
        if last is not None and (now - last).total_seconds() < every_s and now >= last:
            return False
        spend.refresh_claimed = now
        return True
