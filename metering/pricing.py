"""What a request cost, in dollars: marginal and fully loaded.

- **Marginal**: the request's own GPU-seconds x the replica's price per
  GPU-hour / 3600 (GPU-seconds already count every GPU the replica holds), or,
  for a tier priced per token, its tokens x those prices.
- **Fully loaded**: marginal plus the request's share of the replica's idle
  GPU time, times an ``overhead_factor`` for operations (default 1.25; 20-30%
  is the usual figure for the people, networking and storage around GPUs).
  The idle share is proportional to use: over a recent window the replica was
  idle ``idle`` GPU-seconds while busy ``busy``, so each busy GPU-second carries
  ``idle / busy`` idle GPU-seconds with it. The window is the caller's
  (``metering.utilisation``); a replica idle all window long gives its only
  request the whole window's idle cost, which is what it really cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from metering.money import ZERO, usd

SECONDS_PER_HOUR = Decimal(3600)
PER_MTOK = Decimal(1_000_000)
DEFAULT_OVERHEAD = Decimal("1.25")


@dataclass(frozen=True, slots=True)
class TokenPrices:
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal


@dataclass(frozen=True, slots=True)
class Cost:
    marginal: Decimal
    loaded: Decimal

    @classmethod
    def free(cls) -> Cost:
        return cls(ZERO, ZERO)


def gpu_cost(gpu_seconds: float, gpu_hourly_usd: Decimal) -> Decimal:
    return usd(Decimal(repr(gpu_seconds)) * gpu_hourly_usd / SECONDS_PER_HOUR)


def _unrounded_gpu_cost(gpu_seconds: float, gpu_hourly_usd: Decimal) -> Decimal:
    return Decimal(repr(gpu_seconds)) * gpu_hourly_usd / SECONDS_PER_HOUR


def token_cost(prompt_tokens: int, completion_tokens: int, prices: TokenPrices) -> Decimal:
    return usd(
        (prompt_tokens * prices.input_usd_per_mtok + completion_tokens * prices.output_usd_per_mtok)
        / PER_MTOK
    )


def price_request(
    *,
    gpu_seconds: float,
    gpu_hourly_usd: Decimal,
    prompt_tokens: int,
    completion_tokens: int,
    token_prices: TokenPrices | None,
    idle_per_busy: float,
    overhead_factor: Decimal = DEFAULT_OVERHEAD,
) -> Cost:
    """Both figures for one request; token prices, when the tier has them, win."""
    if token_prices is not None:
        marginal = token_cost(prompt_tokens, completion_tokens, token_prices)
        return Cost(marginal, usd(marginal * overhead_factor))
    exact = _unrounded_gpu_cost(gpu_seconds, gpu_hourly_usd)
    loaded = exact * (1 + Decimal(repr(max(0.0, idle_per_busy)))) * overhead_factor
    return Cost(usd(exact), usd(loaded))
