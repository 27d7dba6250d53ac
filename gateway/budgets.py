"""Per-tenant budgets, enforced: refuse a tenant's requests once its budget is spent.

The spend of the current UTC day and month is kept per tenant in a
``SpendTracker`` (``metering.budget``): what this gateway metered, plus, at
most about once a second per tenant, the spend counters in Redis
(``cache.spend``), so that
several gateways see each other's spend (the larger of the two wins; each
undercounts). The refresh runs in a background task that the guard holds
and cancels at shutdown; a request never waits on Redis for its budget.

A request is checked before it goes upstream; its own cost is known only
afterwards, so the request that crosses the line completes, and the next
one is refused with 429 ``budget_exceeded`` and ``Retry-After`` set to the
window's reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from decimal import Decimal

from cache.spend import SpendCounters
from gateway.config import BudgetConfig
from gateway.errors import BudgetExceeded
from metering.budget import Budget, BudgetStatus, SpendTracker, budget_amount
from metering.report import RequestReport

log = logging.getLogger("tollway.budgets")


class BudgetGuard:
    def __init__(self, budgets: dict[str, BudgetConfig], counters: SpendCounters | None):
        self.budgets = {
            tenant: Budget(
                None if b.daily_usd is None else Decimal(str(b.daily_usd)),
                None if b.monthly_usd is None else Decimal(str(b.monthly_usd)),
            )
            for tenant, b in budgets.items()
        }
        self.active = bool(self.budgets)  # any tenant budgeted: else nothing to spend
        self.counters = counters
        self.tracker = SpendTracker()
        self._tasks: set[asyncio.Task[None]] = set()

    def check(self, tenant: str) -> BudgetStatus | None:
        """The tenant's budget status; raises ``BudgetExceeded`` when it is spent."""
        budget = self.budgets.get(tenant)
        if budget is None:
            return None
        now = datetime.now(UTC)
        if self.counters is not None and self.tracker.claim_refresh(tenant, now):
            task = asyncio.get_running_loop().create_task(self._refresh(tenant, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        status = self.tracker.check(tenant, budget, now)
        if status.exceeded:
            raise BudgetExceeded(
                status.message(),
                retry_after_s=status.retry_after_s(now),
                remaining=status.headers(),
            )
        return status

    def headers_for(self, report: RequestReport) -> dict[str, str]:
        """The budget headers of ``report``'s answer: what is left once it is spent."""
        budget = self.budgets.get(report.tenant)
        if budget is None:
            return {}
        pending = budget_amount(report.cost)
        return self.tracker.check(report.tenant, budget, datetime.now(UTC), pending).headers()

    def spend(self, report: RequestReport) -> None:
        """Add a settled request to its tenant's spend."""
        if report.tenant in self.budgets:
            self.tracker.add(report.tenant, budget_amount(report.cost), datetime.now(UTC))

    async def _refresh(self, tenant: str, now: datetime) -> None:
        assert self.counters is not None
        try:
            spent = await self.counters.spend(tenant, now)
        except Exception:  # a bug, not Redis (which fails open): keep serving, say so
            log.exception("refreshing the spend of tenant %s failed", tenant)
            return
        if spent is not None:
            day, month = budget_amount(spent.day), budget_amount(spent.month)
            self.tracker.refresh(tenant, day, month, now)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
