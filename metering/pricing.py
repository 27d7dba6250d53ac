"""What a request cost, in dollars: marginal and fully loaded, as exact integer nano-dollars.

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
  request the whole window's idle cost, which is what it really cost. The
  share is priced in whole millionths (``idle_millionths``): finer than any
  window measures it.

Arithmetic: every input is turned into an exact integer ratio (a float's
exact binary value, a configured Decimal's exact decimal value, the idle
share's millionths), the product is formed in integers and rounded once, half
to even, to nano-dollars (``metering.money``). No float and no Decimal context
touches a result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from metering.money import NANOS_PER_USD, Ratio, from_nanos, ratio, round_half_even, to_nanos

SECONDS_PER_HOUR = 3600
MICROS_PER_SECOND = 1_000_000
PER_MTOK = 1_000_000
IDLE_SCALE = 1_000_000  # the idle share is priced in whole millionths
DEFAULT_OVERHEAD = Decimal("1.25")


@dataclass(frozen=True, slots=True)
class TokenPrices:
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal


class Cost(NamedTuple):
    """Marginal and fully loaded dollars of one request, as integer nano-dollars.

    A tuple, made once per request: ``Cost(marginal_nanos, loaded_nanos)``.
    ``Cost.of_usd`` takes Decimal dollars (quantized to nano-dollars);
    ``marginal`` and ``loaded`` give Decimals back for the edges (budgets,
    the usage API).
    """

    marginal_nanos: int = 0
    loaded_nanos: int = 0

    @classmethod
    def of_usd(cls, marginal: Decimal, loaded: Decimal) -> Cost:
        return cls(to_nanos(marginal), to_nanos(loaded))

    @property
    def marginal(self) -> Decimal:
        return from_nanos(self.marginal_nanos)

    @property
    def loaded(self) -> Decimal:
        return from_nanos(self.loaded_nanos)

    def __repr__(self) -> str:
        return f"Cost(marginal={self.marginal!s}, loaded={self.loaded!s})"


NO_COST = Cost()  # nothing charged


def idle_millionths(idle_per_busy: float) -> int:
    """The idle share priced: whole millionths of an idle GPU-second per busy one.

    0 for a share that is not a positive finite number (NaN, an infinity: a
    bug upstream must not fail a request).
    """
    if 0 < idle_per_busy < math.inf:  # False for NaN
        return round(idle_per_busy * IDLE_SCALE)
    return 0


def price_gpu(gpu_us: int, hourly: Ratio, idle_per_busy: float, factor: Ratio) -> Cost:
    """``gpu_us`` micro-GPU-seconds (what the header prints, so a reader can redo the sum)
    at ``hourly`` dollars per GPU-hour; ``hourly`` and ``factor`` exact ratios
    (``money.ratio``).

    marginal = GPU-seconds x hourly / 3600; loaded = marginal x (1 + idle) x factor,
    with idle in whole millionths (``idle_millionths``), each rounded once from the
    exact product.
    """
    num = gpu_us * hourly[0] * NANOS_PER_USD
    den = hourly[1] * SECONDS_PER_HOUR * MICROS_PER_SECOND
    idle = idle_millionths(idle_per_busy)
    loaded = round_half_even(num * (IDLE_SCALE + idle) * factor[0], den * IDLE_SCALE * factor[1])
    return Cost(round_half_even(num, den), loaded)


class GpuTariff:
    """One replica's GPU price, the overhead factor, and where its idle share comes from.

    ``price_at(gpu_us, now)`` is ``price_gpu`` at the replica's idle share
    ``idle_of(now)`` (over its recent window, ``metering.utilisation``), read
    again only once ``fresh_s`` has passed: the share of a five-minute window
    does not move within a tenth of a second.
    """

    def __init__(
        self, hourly: Ratio, factor: Ratio, idle_of: Callable[[float], float], fresh_s: float = 0.1
    ):
        self.hourly = hourly
        self.factor = factor
        self._idle_of = idle_of
        self._fresh_s = fresh_s
        self._idle = 0.0
        self._until = -math.inf  # the idle share read last holds until then

    def price_at(self, gpu_us: int, now: float) -> Cost:
        if now > self._until:
            self._until = now + self._fresh_s
            self._idle = self._idle_of(now)
        return price_gpu(gpu_us, self.hourly, self._idle, self.factor)


def _token_nanos(prompt_tokens: int, completion_tokens: int, prices: TokenPrices) -> int:
    an, ad = ratio(prices.input_usd_per_mtok)
    bn, bd = ratio(prices.output_usd_per_mtok)
    return round_half_even(
        (prompt_tokens * an * bd + completion_tokens * bn * ad) * NANOS_PER_USD,
        ad * bd * PER_MTOK,
    )


def price_tokens(
    prompt_tokens: int, completion_tokens: int, prices: TokenPrices, factor: Ratio
) -> Cost:
    """A token-priced tier: tokens x prices; loaded = the rounded marginal x ``factor``."""
    marginal = _token_nanos(prompt_tokens, completion_tokens, prices)
    return Cost(marginal, round_half_even(marginal * factor[0], factor[1]))
