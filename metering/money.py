"""Money without float drift: integer nano-dollars on the hot path, Decimal at the edges.

A request on a small model can cost $0.00005, so micro-dollars would round
away a visible share of it; nano-dollars keep nine decimals. Prices are
computed as exact integer ratios and rounded once, half to even, to whole
nano-dollars (``round_half_even``); headers print those integers
(``fmt_nanos``) and the ledger and Prometheus add them, so adding a million
requests gives exactly the sum of the headers they carried. ``Decimal`` is
what the configuration, the usage API and budgets speak (``usd``,
``from_nanos``), converted at those edges only: a ``Decimal`` operation costs
about as much as the whole integer price.
"""

from __future__ import annotations

import functools
from decimal import ROUND_HALF_EVEN, Decimal

NANO = Decimal("0.000000001")
NANOS_PER_USD = 1_000_000_000
ZERO = Decimal(0).quantize(NANO)

Ratio = tuple[int, int]  # (numerator, denominator > 0): an exact rational


def usd(value: Decimal | int | float | str) -> Decimal:
    """A dollar amount, quantized to nano-dollars (floats go through their shortest repr)."""
    if isinstance(value, float):
        value = repr(value)
    return Decimal(value).quantize(NANO, rounding=ROUND_HALF_EVEN)


def to_nanos(amount: Decimal) -> int:
    return int(usd(amount) * NANOS_PER_USD)


def from_nanos(nanos: int) -> Decimal:
    return usd(Decimal(nanos) / NANOS_PER_USD)


def fmt(amount: Decimal) -> str:
    """Fixed-point, nine decimals: what headers and the usage API print."""
    return f"{amount:.9f}"


def fmt_nanos(nanos: int) -> str:
    """``fmt(from_nanos(nanos))`` without a Decimal: the header's spelling of an integer."""
    if nanos < 0:
        whole, frac = divmod(-nanos, NANOS_PER_USD)
        return f"-{whole}.{frac:09d}"
    whole, frac = divmod(nanos, NANOS_PER_USD)
    return f"{whole}.{frac:09d}"


@functools.lru_cache(maxsize=1024)  # prices and factors: a few per configuration
def ratio(value: Decimal) -> Ratio:
    """A configured Decimal (a price, a factor) as an exact integer ratio."""
    return value.as_integer_ratio()


def round_half_even(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` (denominator > 0) rounded to an integer, ties to even."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient & 1):
        quotient += 1
    return quotient
