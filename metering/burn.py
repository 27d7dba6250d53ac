"""Burn rate: dollars per hour over a sliding window, for the gateway and each tenant.

Spend is added in buckets of ``bucket_s`` seconds; the rate is the sum of the
buckets still inside ``window_s``, scaled to an hour. O(1) to add, O(buckets)
to read (60 by default). Budget-aware routing reads it to decide whether to
send more traffic to cheaper tiers (``router.tiers.shift_cut_points``).
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal


class BurnRate:
    def __init__(self, window_s: float = 300.0, bucket_s: float = 5.0):
        if window_s <= 0 or bucket_s <= 0 or bucket_s > window_s:
            raise ValueError("need 0 < bucket_s <= window_s")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._buckets: deque[list[float]] = deque()  # [bucket start, usd]

    def add(self, usd: Decimal | float, now: float) -> None:
        start = now - now % self.bucket_s
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += float(usd)
        else:
            self._buckets.append([start, float(usd)])
        self._trim(now)

    def usd_per_hour(self, now: float) -> float:
        self._trim(now)
        return sum(usd for _, usd in self._buckets) * 3600.0 / self.window_s

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self.bucket_s <= now - self.window_s:
            self._buckets.popleft()
