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
  window measures it, and it keeps the hot path's divisors small.

Arithmetic: every input is turned into an exact integer ratio (a float's
exact binary value, a configured Decimal's exact decimal value, the idle
share's millionths), the product is formed in integers and rounded once, half
to even, to nano-dollars (``metering.money``). No float and no Decimal context
touches a result, and a price costs a fraction of the same sums in Decimal
(measured; it runs on every request).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
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
# Cost((marginal, loaded)) without the Python-level ``__new__``: the hot path's.
_cost: Callable[[tuple[int, int]], Cost] = partial(tuple.__new__, Cost)


def idle_millionths(idle_per_busy: float) -> int:
    """The idle share priced: whole millionths of an idle GPU-second per busy one.

    0 for a share that is not a positive finite number (NaN, an infinity: a
    bug upstream must not fail a request).
    """
    if 0 < idle_per_busy < math.inf:  # False for NaN
        return round(idle_per_busy * IDLE_SCALE)
    return 0


def gpu_cost(gpu_seconds: float, gpu_hourly_usd: Decimal) -> Decimal:
    return from_nanos(price_gpu(gpu_seconds, ratio(gpu_hourly_usd), 0.0, (1, 1)).marginal_nanos)


def token_cost(prompt_tokens: int, completion_tokens: int, prices: TokenPrices) -> Decimal:
    return from_nanos(_token_nanos(prompt_tokens, completion_tokens, prices))


def price_gpu(gpu_seconds: float, hourly: Ratio, idle_per_busy: float, factor: Ratio) -> Cost:
    """The reference price: ``hourly`` and ``factor`` exact ratios (``money.ratio``).

    marginal = GPU-seconds x hourly / 3600; loaded = marginal x (1 + idle) x factor,
    with idle in whole millionths (``idle_millionths``), each rounded once from the
    exact product.
    """
    gn, gd = gpu_seconds.as_integer_ratio()
    num = gn * hourly[0] * NANOS_PER_USD
    den = gd * hourly[1] * SECONDS_PER_HOUR
    marginal = round_half_even(num, den)
    fn, fd = factor
    idle = idle_millionths(idle_per_busy)
    loaded = round_half_even(num * (IDLE_SCALE + idle) * fn, den * IDLE_SCALE * fd)
    return Cost(marginal, loaded)


class GpuTariff:
    """One replica's GPU price and the overhead factor, pre-multiplied for the hot path.

    ``price(gpu_us, idle_per_busy)`` is ``price_gpu`` of ``gpu_us / 1e6``
    GPU-seconds (what the header prints, so a reader can redo the sum). It runs
    once per request, so its ratios are kept in lowest terms (small divisors
    divide in one machine step) and the loaded ratio is remade only when the
    idle share changes; ``price_at(gpu_us, now)`` reads the share itself from
    ``idle_of`` (the replica's window), again only once ``fresh_s`` has passed.
    """

    __slots__ = ("_base", "_fresh_s", "_idle", "_idle_of", "_loaded", "_marginal", "_until")

    def __init__(
        self,
        hourly: Ratio,
        factor: Ratio,
        idle_of: Callable[[float], float] | None = None,
        fresh_s: float = 0.1,
    ):
        self._idle_of = idle_of  # the replica's idle share at a time (``price_at``)
        self._fresh_s = fresh_s
        self._until = -math.inf  # the idle share read last holds until then
        hn, hd = hourly
        per = SECONDS_PER_HOUR * MICROS_PER_SECOND  # hourly price -> per micro-GPU-second
        self._marginal = _lowest(hn * NANOS_PER_USD, hd * per)
        self._base = (hn * NANOS_PER_USD * factor[0], hd * per * factor[1])
        self._idle = 0.0
        self._loaded = _lowest(*self._base)

    def price_at(self, gpu_us: int, now: float) -> Cost:
        """``price`` at the idle share ``idle_of(now)``, read again only once more than
        ``fresh_s`` has passed since the last read.

        The request path's one call (the arithmetic is here, not behind another
        call): the share of a five-minute window does not move within a tenth of
        a second (``metering.utilisation``).
        """
        if now > self._until:
            self._refresh(now)
        mn, md = self._marginal
        marginal, rest = divmod(gpu_us * mn, md)
        if 2 * rest > md or (2 * rest == md and marginal & 1):
            marginal += 1
        ln, ld = self._loaded
        loaded, rest = divmod(gpu_us * ln, ld)
        if 2 * rest > ld or (2 * rest == ld and loaded & 1):
            loaded += 1
        return _cost((marginal, loaded))

    def rates_at(self, now: float) -> tuple[Ratio, Ratio]:
        """The marginal and loaded nano-dollars per micro-GPU-second at ``now``, as
        ``price_at`` uses them (for ``metering.native``, which prices in C)."""
        if now > self._until:
            self._refresh(now)
        return self._marginal, self._loaded

    def _refresh(self, now: float) -> None:
        if self._idle_of is None:
            raise TypeError("this tariff was built without an idle share to read")
        self._until = now + self._fresh_s
        self._use(self._idle_of(now))

    def price(self, gpu_us: int, idle_per_busy: float) -> Cost:
        """At the idle share given (kept until ``price_at`` next reads one)."""
        self._use(idle_per_busy)
        return self.price_at(gpu_us, -math.inf)  # no time is later than the last read

    def _use(self, idle_per_busy: float) -> None:
        if idle_per_busy != self._idle:  # also for NaN, which prices as 0
            idle = idle_millionths(idle_per_busy)
            bn, bd = self._base
            self._loaded = _lowest(bn * (IDLE_SCALE + idle), bd * IDLE_SCALE)
            self._idle = idle_per_busy


def _lowest(numerator: int, denominator: int) -> Ratio:
    common = math.gcd(numerator, denominator) or 1
    return numerator // common, denominator // common


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
