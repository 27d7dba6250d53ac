"""Budgets enforced under any concurrency: each request's worst case is held before it runs.

Before a request is dispatched upstream, ``reserve`` holds its worst-case
loaded cost (``metering.estimate``) against every budget that applies to it
(its tenant's daily and monthly, its key's daily and monthly) in one atomic
Redis call shared by every gateway (``cache.spend``): if any lacks room, the
request is refused with 429 ``budget_exceeded``, naming the budget and when
it resets. When the request settles, its metered cost is added to the spend
and its hold let go (``cache.spend``'s flush, every ``ledger.sync_interval_s``);
a hold whose gateway died is let go after ``reservations.hold_s``. So the
spend of any number of gateways stays within a budget, give or take what the
estimates under-guess.

Answers that run nothing (cache hits, coalesced answers, replays) hold
nothing. Redis unreachable: the tenant's ``on_redis_down`` policy decides,
``fail_open`` (served unchecked, counted in ``tollway_budget_unchecked_total``;
the ledger has the spend and rebuilds the counters) or ``fail_closed`` (503).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import orjson

from cache.spend import SpendCounters, window_keys
from gateway.config import BudgetConfig, RedisDown, ReservationConfig
from gateway.context import RequestContext
from gateway.errors import BudgetExceeded, ServiceUnavailable
from metering.budget import REMAINING_HEADER, Budget, BudgetName, day_reset, month_reset
from metering.estimate import CostEstimator, output_tokens_at_most, prompt_tokens_at_most
from metering.money import fmt, fmt_nanos, from_nanos, to_nanos
from metering.report import RequestReport


@dataclass(frozen=True, slots=True)
class Window:
    """One budget a request is held against: whose, which, how much, until when."""

    key: str  # the Redis hash of its spend
    limit_nanos: int
    name: BudgetName
    scope: str  # "tenant" or "key"
    resets_at: datetime

    def refusal(self, now: datetime) -> tuple[str, int]:
        """The 429's message and Retry-After."""
        whose = "this API key's tenant" if self.scope == "tenant" else "this API key"
        resets = self.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        message = (
            f"The {self.name} budget of ${fmt(from_nanos(self.limit_nanos))} for {whose} "
            f"is spent (with the requests running now); it resets at {resets}."
        )
        return message, max(1, math.ceil((self.resets_at - now).total_seconds()))


@dataclass(frozen=True, slots=True)
class Held:
    tenant: str
    amount_nanos: int
    remaining_nanos: int  # the tightest budget's room once this hold was taken


class BudgetGuard:
    def __init__(
        self,
        budgets: dict[str, BudgetConfig],
        control: ReservationConfig,
        counters: SpendCounters,
        estimator: CostEstimator,
        *,
        hold_s: float,
        output_caps: dict[str, int],
        on_unchecked: Callable[[str], None] = lambda tenant: None,
    ):
        self.budgets = {
            tenant: _budget(b.daily_usd, b.monthly_usd) for tenant, b in budgets.items()
        }
        self.policies: dict[str, RedisDown] = {
            tenant: b.on_redis_down or control.on_redis_down for tenant, b in budgets.items()
        }
        self.default_policy = control.on_redis_down
        self.counters = counters
        self.estimator = estimator
        self.hold_s = hold_s
        self.output_caps = output_caps
        self.on_unchecked = on_unchecked
        self._held: dict[str, Held] = {}  # request id -> its hold, until settled

    def windows(self, ctx: RequestContext, now: datetime) -> list[Window]:
        """Every budget that applies to the request: its tenant's, then its key's."""
        out: list[Window] = []
        for scope, budget, key_id in (
            ("tenant", self.budgets.get(ctx.tenant), ""),
            ("key", ctx.key_budget, ctx.key_id),
        ):
            if budget is None:
                continue
            day, month = window_keys(self.counters.prefix, ctx.tenant, now, key_id)
            if budget.daily_usd is not None:
                out.append(Window(day, to_nanos(budget.daily_usd), "daily", scope, day_reset(now)))
            if budget.monthly_usd is not None:
                limit = to_nanos(budget.monthly_usd)
                out.append(Window(month, limit, "monthly", scope, month_reset(now)))
        return out

    async def reserve(self, ctx: RequestContext, tier: str, body: bytes) -> None:
        """Hold the request's worst case against its budgets, or refuse it (429; 503 when
        Redis is down and the tenant fails closed). Nothing to do without a budget."""
        now = datetime.now(UTC)
        windows = self.windows(ctx, now)
        if not windows or ctx.request_id in self._held:
            return
        parsed = orjson.loads(body)
        amount = self.estimator.nanos(
            tier,
            prompt_tokens_at_most(parsed),
            output_tokens_at_most(parsed, self.output_caps.get(tier, 4096)),
        )
        limits = [(w.key, w.limit_nanos) for w in windows]
        result = await self.counters.reserve(
            ctx.tenant, ctx.request_id, amount, limits, self.hold_s
        )
        if result is None:
            if self.policies.get(ctx.tenant, self.default_policy) == "fail_closed":
                raise ServiceUnavailable(
                    "Budgets cannot be checked right now (the gateway's Redis is unreachable) "
                    "and this tenant's policy is to refuse rather than spend unchecked."
                )
            self.on_unchecked(ctx.tenant)
            return
        if not result.held:
            assert result.refused is not None
            message, retry_after = windows[result.refused].refusal(now)
            left = max(0, min(result.remaining_nanos))
            raise BudgetExceeded(
                message, retry_after_s=retry_after, remaining={REMAINING_HEADER: fmt_nanos(left)}
            )
        held = Held(ctx.tenant, amount, min(result.remaining_nanos))
        self._held[ctx.request_id] = held
        self.counters.holding(ctx.request_id, ctx.tenant)

    def headers_for(self, report: RequestReport) -> dict[str, str]:
        """The answer's remaining budget: the tightest budget's room once it is spent
        (other requests' holds at its reservation counted); none without a hold."""
        held = self._held.get(report.request_id)
        if held is None:
            return {}
        left = held.remaining_nanos + held.amount_nanos - report.cost.loaded_nanos
        return {REMAINING_HEADER: fmt_nanos(max(0, left))}

    def spend(self, report: RequestReport) -> None:
        """A request settled: its hold goes (its spend is counted by ``cache.spend``)."""
        self._held.pop(report.request_id, None)

    async def stop(self) -> None:
        """Nothing runs in the background: holds not yet let go expire."""


def _budget(daily: float | None, monthly: float | None) -> Budget:
    return Budget(
        None if daily is None else Decimal(str(daily)),
        None if monthly is None else Decimal(str(monthly)),
    )
