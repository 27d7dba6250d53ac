"""The usage ledger's read side as plain data: rows, grouping and hour buckets.

Owns ``UsageRow`` (the sums for one group), ``totals``, the ``GroupBy``
choices and how the hour hashes read from Redis fold into rows
(``group_rows``), plus the hour buckets a query window covers. No Redis here:
``cache.ledger`` reads the hashes and hands them over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from cache.ledger_write import METRICS, SEP
from metering.budget import utc
from metering.money import from_nanos, to_nanos

GroupBy = Literal["tenant", "tier", "model", "day", "cache"]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Sums for one group (a tenant, tier, model, cache status or UTC day ``YYYY-MM-DD``)."""

    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    gpu_us: int
    cost_usd: Decimal
    cost_loaded_usd: Decimal
    saved_usd: Decimal

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def gpu_seconds(self) -> float:
        return self.gpu_us / 1_000_000

    @classmethod
    def from_sums(cls, key: str, sums: Sequence[int]) -> UsageRow:
        """From the integer sums in ``METRICS`` order (dollars in nano-dollars)."""
        requests, prompt, completion, cached, gpu_us, cost, loaded, saved = sums
        usd = from_nanos
        return cls(
            key, requests, prompt, completion, cached, gpu_us, usd(cost), usd(loaded), usd(saved)
        )

    def sums(self) -> tuple[int, ...]:
        money = (self.cost_usd, self.cost_loaded_usd, self.saved_usd)
        counts = (self.requests, self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        return (*counts, self.gpu_us, *(to_nanos(amount) for amount in money))


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """The hour buckets that overlap ``[start, end)``."""
    start, end = utc(start), utc(end)
    hour = start.replace(minute=0, second=0, microsecond=0)
    out: list[datetime] = []
    if end <= start:
        return out
    while hour < end:
        out.append(hour)
        hour += timedelta(hours=1)
    return out


def group_rows(
    group_by: GroupBy,
    pairs: Sequence[tuple[str, str]],
    hashes: Sequence[Mapping[bytes, bytes]],
) -> list[UsageRow]:
    """Fold the tenant-hour hashes (one per ``(hour, tenant)`` pair) into rows sorted by key."""
    groups: dict[str, list[int]] = {}
    for (hour, name), found in zip(pairs, hashes, strict=True):
        for raw, value in found.items():
            tier, model, cache, metric = raw.decode().split(SEP)
            key = _group_key(group_by, hour, name, tier, model, cache)
            sums = groups.setdefault(key, [0] * len(METRICS))
            sums[METRICS.index(metric)] += int(value)
    return [UsageRow.from_sums(key, groups[key]) for key in sorted(groups)]


def _group_key(group_by: GroupBy, hour: str, tenant: str, tier: str, model: str, cache: str) -> str:
    if group_by == "day":
        return f"{hour[:4]}-{hour[4:6]}-{hour[6:8]}"
    return {"tenant": tenant, "tier": tier, "model": model, "cache": cache}[group_by]


def totals(rows: Iterable[UsageRow], key: str = "total") -> UsageRow:
    """The exact sum of rows: the usage API's ``total`` and the CLI table's last line."""
    sums = [0] * len(METRICS)
    for row in rows:
        sums = [a + b for a, b in zip(sums, row.sums(), strict=True)]
    return UsageRow.from_sums(key, sums)
