"""A replica's recent idle-to-busy ratio, for the fully loaded cost.

Samples of the ledger's cumulative idle GPU-seconds and wall GPU-seconds are
taken at most every ``sample_s``; the ratio is read across the samples of
the last ``window_s`` (plus the one just before, as the window's base). O(1)
per call: busy time is wall x gpus minus idle, no sum over requests. Every
request's loaded price reads it, so a ratio is reused for ``fresh_s`` (0.1 s):
over a five-minute window that changes no figure a reader could act on, and a
busy replica's requests skip the ledger's bookkeeping.
"""

from __future__ import annotations

from collections import deque

from metering.occupancy import OccupancyLedger


class UtilisationWindow:
    def __init__(
        self,
        ledger: OccupancyLedger,
        *,
        window_s: float = 300.0,
        sample_s: float = 5.0,
        fresh_s: float = 0.1,
    ):
        self.ledger = ledger
        self.window_s = window_s
        self.sample_s = sample_s
        self.fresh_s = fresh_s
        self._last = (float("-inf"), 0.0)  # (when, ratio): the latest answer
        self._samples: deque[tuple[float, float, float]] = deque()  # (time, idle, wall x gpus)
        self._sample(ledger.began)

    def _sample(self, now: float) -> None:
        self.ledger.advance(now)
        self._samples.append((now, self.ledger.idle_gpu_s, self.ledger.wall_gpu_s))

    def idle_per_busy(self, now: float) -> float:
        """Idle GPU-seconds per busy GPU-second over the window (0 when nothing was busy)."""
        when, last = self._last
        if 0 <= now - when < self.fresh_s:
            return last
        if now - self._samples[-1][0] >= self.sample_s:
            self._sample(now)
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        self.ledger.advance(now)
        _, idle0, wall0 = self._samples[0]
        idle = self.ledger.idle_gpu_s - idle0
        busy = (self.ledger.wall_gpu_s - wall0) - idle
        ratio = idle / busy if busy > 0 else 0.0
        self._last = (now, ratio)
        return ratio
