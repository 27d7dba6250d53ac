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
  request the whole window's idle cost, which is what it really cost.

Arithmetic: every input is turned into an exact integer ratio (a float's
exact binary value, a configured Decimal's exact decimal value), the product
is formed in integers and rounded once, half to even, to nano-dollars
(``metering.money``). No float and no Decimal context touches a result, and a
price costs about a microsecond instead of the ~12 of the same sums in
Decimal (measured; it runs on every request).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

from metering.money import NANOS_PER_USD, Ratio, from_nanos, ratio, round_half_even, to_nanos

SECONDS_PER_HOUR = 3600
MICROS_PER_SECOND = 1_000_000
PER_MTOK = 1_000_000
DEFAULT_OVERHEAD = Decimal("1.25")


@dataclass(frozen=True, slots=True)
class TokenPrices:
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal


class Cost:
    """Marginal and fully loaded dollars of one request, held as integer nano-dollars.

    ``Cost(marginal, loaded)`` takes Decimal dollars (quantized to nano-dollars);
    ``Cost.of_nanos`` takes the integers the hot path computes. ``marginal`` and
    ``loaded`` give Decimals back for the edges (budgets, the usage API).
    """

    __slots__ = ("loaded_nanos", "marginal_nanos")

    FREE: ClassVar[Cost]  # nothing charged (set below)
    marginal_nanos: int
    loaded_nanos: int

    def __init__(self, marginal: Decimal, loaded: Decimal):
        self.marginal_nanos = to_nanos(marginal)
        self.loaded_nanos = to_nanos(loaded)

    @classmethod
    def of_nanos(cls, marginal_nanos: int, loaded_nanos: int) -> Cost:
        cost = cls.__new__(cls)
        cost.marginal_nanos = marginal_nanos
        cost.loaded_nanos = loaded_nanos
        return cost

    @classmethod
    def free(cls) -> Cost:
        return cls.FREE

    @property
    def marginal(self) -> Decimal:
        return from_nanos(self.marginal_nanos)

    @property
    def loaded(self) -> Decimal:
        return from_nanos(self.loaded_nanos)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cost):
            return NotImplemented
        return (self.marginal_nanos, self.loaded_nanos) == (
            other.marginal_nanos,
            other.loaded_nanos,
        )

    def __hash__(self) -> int:
        return hash((self.marginal_nanos, self.loaded_nanos))

    def __repr__(self) -> str:
        return f"Cost(marginal={self.marginal!s}, loaded={self.loaded!s})"


Cost.FREE = Cost.of_nanos(0, 0)


def gpu_cost(gpu_seconds: float, gpu_hourly_usd: Decimal) -> Decimal:
    return from_nanos(price_gpu(gpu_seconds, ratio(gpu_hourly_usd), 0.0, (1, 1)).marginal_nanos)


def token_cost(prompt_tokens: int, completion_tokens: int, prices: TokenPrices) -> Decimal:
    return from_nanos(_token_nanos(prompt_tokens, completion_tokens, prices))


def price_gpu(gpu_seconds: float, hourly: Ratio, idle_per_busy: float, factor: Ratio) -> Cost:
    """The hot path's price: ``hourly`` and ``factor`` already exact ratios (``money.ratio``).

    marginal = GPU-seconds x hourly / 3600; loaded = marginal x (1 + idle) x factor,
    each rounded once from the exact product.
    """
    gn, gd = gpu_seconds.as_integer_ratio()
    num = gn * hourly[0] * NANOS_PER_USD
    den = gd * hourly[1] * SECONDS_PER_HOUR
    marginal = round_half_even(num, den)
    fn, fd = factor
    if idle_per_busy > 0:  # also False for NaN
        inum, iden = idle_per_busy.as_integer_ratio()
        return Cost.of_nanos(marginal, round_half_even(num * (iden + inum) * fn, den * iden * fd))
    return Cost.of_nanos(marginal, round_half_even(num * fn, den * fd))


class GpuTariff:
    """One replica's GPU price and the overhead factor, pre-multiplied for the hot path.

    ``price(gpu_us, idle_per_busy)`` is ``price_gpu`` of ``gpu_us / 1e6``
    GPU-seconds (what the header prints, so a reader can redo the sum) with
    fewer big multiplications and no calls: it runs once per request.
    """

    __slots__ = ("_loaded", "_marginal")

    def __init__(self, hourly: Ratio, factor: Ratio):
        hn, hd = hourly
        per = SECONDS_PER_HOUR * MICROS_PER_SECOND  # hourly price -> per micro-GPU-second
        self._marginal = (hn * NANOS_PER_USD, hd * per)
        self._loaded = (hn * NANOS_PER_USD * factor[0], hd * per * factor[1])

    def price(self, gpu_us: int, idle_per_busy: float) -> Cost:
        mn, md = self._marginal
        ln, ld = self._loaded
        num, den = gpu_us * mn, md
        marginal, rest = divmod(num, den)
        if 2 * rest > den or (2 * rest == den and marginal & 1):
            marginal += 1
        if idle_per_busy > 0:  # also False for NaN
            inum, iden = idle_per_busy.as_integer_ratio()
            num, den = gpu_us * ln * (iden + inum), ld * iden
        else:
            num, den = gpu_us * ln, ld
        loaded, rest = divmod(num, den)
        if 2 * rest > den or (2 * rest == den and loaded & 1):
            loaded += 1
        return Cost.of_nanos(marginal, loaded)


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
    return Cost.of_nanos(marginal, round_half_even(marginal * factor[0], factor[1]))


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
    factor = ratio(overhead_factor)
    if token_prices is not None:
        return price_tokens(prompt_tokens, completion_tokens, token_prices, factor)
    return price_gpu(gpu_seconds, ratio(gpu_hourly_usd), idle_per_busy, factor)
