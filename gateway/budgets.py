"""Budgets and rate limits enforced under any concurrency, across every gateway.

**Rate limits.** Requests and tokens (prompt + completion) per minute, per
tenant (``rate_limits:``) and per key (config or managed keys), each a GCRA
limit in Redis: a full minute's worth may come at once, then it refills
evenly. A request takes 1 request and its worst-case tokens (prompt
estimate + ``max_tokens``); the tokens it did not use are given back when it
settles. Refused: 429 ``rate_limit_exceeded`` with ``Retry-After``. Answers
of a limited key or tenant carry OpenAI's ``x-ratelimit-limit-requests``,
``-remaining-requests``, ``-reset-requests`` and the ``-tokens`` trio (the
tighter of key and tenant).

**Budgets.** Before a request is dispatched upstream, ``reserve`` holds its worst-case
loaded cost (``metering.estimate``) against every budget that applies to it
(its tenant's daily and monthly, its key's daily and monthly) in one atomic
Redis call shared by every gateway (``cache.spend``): if any lacks room, the
request is refused with 429 ``budget_exceeded``, naming the budget and when
it resets. When the request settles, its metered cost is added to the spend
and its hold let go (``cache.spend``'s flush, every 0.2 s);
a hold whose gateway died is let go after ``reservations.hold_s``. So the
spend of any number of gateways stays within a budget, give or take what the
estimates under-guess.

Both are checked in one atomic Redis call (one round trip) when a request is
dispatched; nothing is taken unless everything has room. Answers that run
nothing (cache hits, coalesced answers, replays) take from neither.

Redis unreachable: the tenant's ``on_redis_down`` policy decides,
``fail_open`` (served unchecked, counted in ``tollway_budget_unchecked_total``;
the ledger has the spend and rebuilds the counters) or ``fail_closed`` (503).
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import NoReturn

from cache.spend import Admission, RateCharge, SpendCounters, rate_key, window_keys
from gateway.config import BudgetConfig, RateLimitConfig, RedisDown, ReservationConfig
from gateway.context import RequestContext
from gateway.errors import BudgetExceeded, RateLimited, RequestTooLarge, ServiceUnavailable
from metering.budget import REMAINING_HEADER, Budget, BudgetName, Held, day_reset, month_reset
from metering.estimate import CostEstimator, output_tokens_at_most, prompt_tokens_at_most
from metering.money import fmt, fmt_nanos, from_nanos, to_nanos
from metering.report import RequestReport

DAY_S = 86_400
PLANS_KEPT = 10_000  # tenant and key pairs whose plans are kept for the day


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
class Limit:
    """One rate limit a request is charged against."""

    kind: str  # "requests" or "tokens"
    scope: str  # "tenant" or "key"
    per_minute: int
    key: str  # its GCRA state in Redis
    period_ms: int = 60_000  # a full minute's units may come at once

    @property
    def per_unit_ms(self) -> float:
        return self.period_ms / self.per_minute

    @property
    def whose(self) -> str:
        return "this API key" if self.scope == "key" else "this API key's tenant"

    def charge(self, units: int) -> RateCharge:
        return RateCharge(self.key, units, self.per_unit_ms, self.period_ms)

    def remaining(self, arrival_ms: int, now_ms: int) -> int:
        """Units left now: what the minute's allowance has beyond the arrival time."""
        used_ms = max(0, arrival_ms - now_ms)
        return max(0, int((self.period_ms - used_ms) / self.per_unit_ms))


@dataclass(frozen=True, slots=True)
class Plan:
    """Every budget window and rate limit that applies to a tenant's (or one of its
    keys') requests on one UTC day: the tenant's, then the key's."""

    windows: tuple[Window, ...]
    limits: tuple[Limit, ...]

    @property
    def empty(self) -> bool:
        return not self.windows and not self.limits


def _duration(ms: float) -> str:
    """OpenAI's spelling of a reset time: "1s", "6m0s", "250ms"."""
    if ms < 1000:
        return f"{max(0, int(ms))}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


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
        rate_limits: dict[str, RateLimitConfig] | None = None,
        on_unchecked: Callable[[str], None] = lambda tenant: None,
    ):
        self.rate_limits = rate_limits or {}
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
        # Hold ids: the request's id (which a client may reuse) and one of this process's.
        self._hold_tag = secrets.token_hex(6)
        self._hold_seq = itertools.count()
        self._plans: dict[tuple[object, ...], Plan] = {}
        self._plans_day = -1

    def plan(self, ctx: RequestContext, day: int) -> Plan:
        """What applies to the request on UTC day ``day`` (days since the epoch), worked out
        once a day per tenant and key."""
        whose = (ctx.tenant, ctx.key_id, ctx.key_budget, ctx.key_rates)
        if day != self._plans_day or len(self._plans) >= PLANS_KEPT:
            self._plans, self._plans_day = {}, day
        plan = self._plans.get(whose)
        if plan is None:
            now = datetime.fromtimestamp(day * DAY_S, UTC)
            plan = self._plans[whose] = Plan(self.windows(ctx, now), self.limits(ctx))
        return plan

    def windows(self, ctx: RequestContext, now: datetime) -> tuple[Window, ...]:
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
        return tuple(out)

    def limits(self, ctx: RequestContext) -> tuple[Limit, ...]:
        """Every rate limit that applies to the request: its tenant's, then its key's."""
        out: list[Limit] = []
        tenant = self.rate_limits.get(ctx.tenant)
        for scope, key_id, rpm, tpm in (
            (
                "tenant",
                "",
                tenant and tenant.requests_per_minute,
                tenant and tenant.tokens_per_minute,
            ),
            ("key", ctx.key_id, *ctx.key_rates),
        ):
            for kind, per_minute in (("requests", rpm), ("tokens", tpm)):
                if per_minute:
                    key = rate_key(self.counters.prefix, ctx.tenant, key_id, kind)
                    out.append(Limit(kind, scope, per_minute, key))
        return tuple(out)

    async def reserve(self, ctx: RequestContext, tier: str, body: bytes) -> None:
        """Take the request's units from its rate limits and hold its worst case against
        its budgets, or refuse it (429; 503 when Redis is down and the tenant fails
        closed). Nothing to do without a limit or a budget."""
        now_s = time.time()
        plan = self.plan(ctx, int(now_s // DAY_S))
        if ctx.hold_id or plan.empty:
            return
        prompt = prompt_tokens_at_most(body)
        cap = self.output_caps.get(tier, 4096)
        output = output_tokens_at_most(ctx.max_tokens, cap) * ctx.choices
        tokens = prompt + output
        charges = []
        for limit in plan.limits:
            if limit.kind == "tokens" and tokens > limit.per_minute:
                raise _too_large(limit, tokens)
            charges.append(limit.charge(tokens if limit.kind == "tokens" else 1))
        amount = self.estimator.nanos(tier, prompt, output) if plan.windows else 0
        hold_id = ctx.hold_id = f"{ctx.request_id}.{self._hold_tag}{next(self._hold_seq):x}"
        given_back = [
            (c.key, c.per_unit_ms, c.units)
            for limit, c in zip(plan.limits, charges, strict=True)
            if limit.kind == "tokens"
        ]
        # Registered before the call: if the client leaves while Redis applies it, the
        # request still settles (its report names the hold), and its hold is let go
        # then, not left to expire.
        self.counters.holding(hold_id, ctx.tenant, given_back)
        result = await self.counters.admit(
            ctx.tenant,
            hold_id,
            amount,
            [(w.key, w.limit_nanos) for w in plan.windows],
            charges,
            self.hold_s,
        )
        if result is None:  # (a hold Redis took but whose reply was lost goes at settlement)
            if self.policies.get(ctx.tenant, self.default_policy) == "fail_closed":
                raise ServiceUnavailable(
                    "Budgets and rate limits cannot be checked right now (the gateway's Redis "
                    "is unreachable) and this tenant's policy is to refuse rather than serve "
                    "unchecked."
                )
            self.on_unchecked(ctx.tenant)
            return
        ctx.headers.update(_rate_headers(plan.limits, result, int(now_s * 1000)))
        if not result.admitted:
            self.counters.forget(hold_id)  # nothing was taken
            ctx.hold_id = ""
            _refuse(plan, result)
        ctx.hold = Held(ctx.tenant, amount, min(result.remaining_nanos) if plan.windows else -1)

    @staticmethod
    def headers_for(ctx: RequestContext, report: RequestReport) -> dict[str, str]:
        """The answer's remaining budget: the tightest budget's room once it is spent
        (other requests' holds at its reservation counted); none without a hold."""
        held = ctx.hold
        if held is None or held.remaining_nanos < 0:  # no hold, or rate limits only
            return {}
        left = held.remaining_nanos + held.amount_nanos - report.cost.loaded_nanos
        return {REMAINING_HEADER: fmt_nanos(max(0, left))}


def _too_large(limit: Limit, tokens: int) -> RequestTooLarge:
    """A request that may use more tokens than its limit allows in a whole minute."""
    return RequestTooLarge(
        f"Request too large for the tokens-per-minute limit of {limit.whose}: it may use up to "
        f"{tokens} tokens (its prompt, estimated as its size / 4, plus max_tokens for each "
        f"choice) and the limit is {limit.per_minute} per minute. Lower max_tokens or send "
        "less."
    )


def _refuse(plan: Plan, result: Admission) -> NoReturn:
    """Raise the refusal the admission call answered with: a rate limit's, or a budget's."""
    assert result.refused is not None
    what, index = result.refused
    if what == "rate":
        limit = plan.limits[index]
        raise RateLimited(
            f"Rate limit reached for {limit.whose}: {limit.per_minute} {limit.kind} per "
            f"minute. Try again in {_duration(result.retry_after_ms)}.",
            retry_after_s=max(1, math.ceil(result.retry_after_ms / 1000)),
        )
    message, retry_after = plan.windows[index].refusal(datetime.now(UTC))
    left = max(0, min(result.remaining_nanos))
    raise BudgetExceeded(
        message, retry_after_s=retry_after, remaining={REMAINING_HEADER: fmt_nanos(left)}
    )


def _rate_headers(limits: tuple[Limit, ...], result: Admission, now_ms: int) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers: for each kind, the limit with the least left."""
    tightest: dict[str, tuple[int, Limit, int]] = {}
    for limit, arrival in zip(limits, result.arrival_ms, strict=True):
        left = limit.remaining(arrival, now_ms)
        seen = tightest.get(limit.kind)
        if seen is None or left < seen[0]:
            tightest[limit.kind] = (left, limit, arrival)
    out: dict[str, str] = {}
    for kind, (left, limit, arrival) in tightest.items():
        out[f"x-ratelimit-limit-{kind}"] = str(limit.per_minute)
        out[f"x-ratelimit-remaining-{kind}"] = str(left)
        out[f"x-ratelimit-reset-{kind}"] = _duration(arrival - now_ms)
    return out


def _budget(daily: float | None, monthly: float | None) -> Budget:
    return Budget(
        None if daily is None else Decimal(str(daily)),
        None if monthly is None else Decimal(str(monthly)),
    )
