"""Money without float drift: Decimal dollars, quantized to nano-dollars.

A request on a small model can cost $0.00005, so micro-dollars would round
away a visible share of it; nano-dollars keep nine decimals. Sums that
finance reads (the ledger) are kept as integer nano-dollars, so adding a
million requests gives exactly the sum of the headers they carried.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

NANO = Decimal("0.000000001")
NANOS_PER_USD = 1_000_000_000
ZERO = Decimal(0).quantize(NANO)


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
