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
and its hold let go (``cache.spend``'s flush, every ``ledger.sync_interval_s``);
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

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import orjson

from cache.spend import Admission, RateCharge, SpendCounters, rate_key, window_keys
from gateway.config import BudgetConfig, RateLimitConfig, RedisDown, ReservationConfig
from gateway.context import RequestContext
from gateway.errors import BudgetExceeded, RateLimited, ServiceUnavailable
from metering.budget import REMAINING_HEADER, Budget, BudgetName, Held, day_reset, month_reset
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
class Limit:
    """One rate limit a request is charged against."""

    kind: str  # "requests" or "tokens"
    scope: str  # "tenant" or "key"
    per_minute: int
    charge: RateCharge

    def remaining(self, arrival_ms: int, now_ms: int) -> int:
        """Units left now: what the minute's allowance has beyond the arrival time."""
        used_ms = max(0, arrival_ms - now_ms)
        return max(0, int((self.charge.period_ms - used_ms) / self.charge.per_unit_ms))


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

    def limits(self, ctx: RequestContext, tokens: int) -> list[Limit]:
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
            for kind, per_minute, units in (("requests", rpm, 1), ("tokens", tpm, tokens)):
                if per_minute:
                    key = rate_key(self.counters.prefix, ctx.tenant, key_id, kind)
                    charge = RateCharge(key, units, 60_000 / per_minute)
                    out.append(Limit(kind, scope, per_minute, charge))
        return out

    async def reserve(self, ctx: RequestContext, tier: str, body: bytes) -> None:
        """Take the request's units from its rate limits and hold its worst case against
        its budgets, or refuse it (429; 503 when Redis is down and the tenant fails
        closed). Nothing to do without a limit or a budget."""
        now = datetime.now(UTC)
        windows = self.windows(ctx, now)
        if ctx.hold is not None or not (windows or self.rate_limits or any(ctx.key_rates)):
            return
        parsed = orjson.loads(body)
        prompt = prompt_tokens_at_most(parsed)
        output = output_tokens_at_most(parsed, self.output_caps.get(tier, 4096))
        limits = self.limits(ctx, prompt + output)
        if not windows and not limits:
            return
        amount = self.estimator.nanos(tier, prompt, output) if windows else 0
        # The client may send one x-request-id on several requests: the hold's id is ours.
        hold_id = f"{ctx.request_id}.{secrets.token_hex(6)}"
        tokens = [
            (limit.charge.key, limit.charge.per_unit_ms, limit.charge.units)
            for limit in limits
            if limit.kind == "tokens"
        ]
        # Registered before the call: if the client leaves while Redis applies it, the
        # request still settles, and its hold is let go then, not left to expire.
        self.counters.holding(ctx.request_id, hold_id, ctx.tenant, tokens)
        result = await self.counters.admit(
            ctx.tenant,
            hold_id,
            amount,
            [(w.key, w.limit_nanos) for w in windows],
            [limit.charge for limit in limits],
            self.hold_s,
        )
        if result is None:
            if self.policies.get(ctx.tenant, self.default_policy) == "fail_closed":
                raise ServiceUnavailable(
                    "Budgets and rate limits cannot be checked right now (the gateway's Redis "
                    "is unreachable) and this tenant's policy is to refuse rather than serve "
                    "unchecked."
                )
            self.on_unchecked(ctx.tenant)
            return
        ctx.headers.update(_rate_headers(limits, result, int(now.timestamp() * 1000)))
        if not result.admitted:
            self.counters.forget(ctx.request_id, hold_id)  # nothing was taken
            assert result.refused is not None
            what, index = result.refused
            if what == "rate":
                limit = limits[index]
                whose = "this API key" if limit.scope == "key" else "this API key's tenant"
                raise RateLimited(
                    f"Rate limit reached for {whose}: {limit.per_minute} {limit.kind} per "
                    f"minute. Try again in {_duration(result.retry_after_ms)}.",
                    retry_after_s=max(1, math.ceil(result.retry_after_ms / 1000)),
                )
            message, retry_after = windows[index].refusal(now)
            left = max(0, min(result.remaining_nanos))
            raise BudgetExceeded(
                message, retry_after_s=retry_after, remaining={REMAINING_HEADER: fmt_nanos(left)}
            )
        ctx.hold = Held(ctx.tenant, amount, min(result.remaining_nanos) if windows else -1)

    @staticmethod
    def headers_for(ctx: RequestContext, report: RequestReport) -> dict[str, str]:
        """The answer's remaining budget: the tightest budget's room once it is spent
        (other requests' holds at its reservation counted); none without a hold."""
        held = ctx.hold
        if held is None or held.remaining_nanos < 0:  # no hold, or rate limits only
            return {}
        left = held.remaining_nanos + held.amount_nanos - report.cost.loaded_nanos
        return {REMAINING_HEADER: fmt_nanos(max(0, left))}


def _rate_headers(limits: list[Limit], result: Admission, now_ms: int) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers: for each kind, the limit with the least left."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        pairs = [
            (limit.remaining(arrival, now_ms), limit, arrival)
            for limit, arrival in zip(limits, result.arrival_ms, strict=True)
            if limit.kind == kind
        ]
        if not pairs:
            continue
        left, limit, arrival = min(pairs, key=lambda p: p[0])
        out[f"x-ratelimit-limit-{kind}"] = str(limit.per_minute)
        out[f"x-ratelimit-remaining-{kind}"] = str(left)
        out[f"x-ratelimit-reset-{kind}"] = _duration(arrival - now_ms)
    return out


def _budget(daily: float | None, monthly: float | None) -> Budget:
    return Budget(
        None if daily is None else Decimal(str(daily)),
        None if monthly is None else Decimal(str(monthly)),
    )
