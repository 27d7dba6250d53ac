"""GPU-seconds under continuous batching: one replica's GPU time, divided among its requests.

Between two consecutive events on a replica (a request starting or finishing
there, or a new reading of vLLM's running count) the interval's GPU-time,
``dt x gpus``, is split equally among the requests in flight. Time with
nothing in flight is idle. So, per replica, at any moment::

    attributed (finished) + accrued (still running) + foreign + idle == wall x gpus

That identity is what makes the numbers auditable: the per-request figures of
a replica add up to its busy GPU-time exactly, with nothing double-counted.

Implementation: a virtual clock ``share`` holds the GPU-seconds that one
request present since the ledger began would have accrued. Each event
advances it by ``dt x gpus / n``; a request's GPU-seconds are the clock at its
finish minus the clock at its start. Every event is O(1), whatever the batch.

Several gateways on one replica. Each gateway sees only its own requests. If
vLLM's ``vllm:num_requests_running`` (scraped, see ``observe_running``) is
larger than the local in-flight count, the excess is taken to be other
gateways' requests: from that scrape on, the divisor is the live local count
plus that excess (at the moment of the scrape, exactly vLLM's count), and the
excess shares are booked as ``foreign``. Holding the excess rather than the
raw count means a stale reading cannot turn this gateway's own finished
requests into phantom foreign load. What this guarantees: no gateway charges
its requests for GPU time that vLLM says others were using. What it does not:
the excess is only as fresh as the last scrape (about a second), vLLM's count
is sampled, not integrated, and gateways do not coordinate, so the per-request
figures of several gateways add up to the replica's busy time only
approximately; within one gateway the identity above holds exactly.

Until admission control keeps a replica's in-flight count within its
``max_num_seqs``, requests waiting inside vLLM's queue are counted as in
flight and share the GPU time with the running ones.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OccupancySnapshot:
    wall_s: float
    gpus: float
    attributed_gpu_s: float
    accrued_gpu_s: float
    foreign_gpu_s: float
    idle_gpu_s: float
    in_flight: int

    @property
    def busy_gpu_s(self) -> float:
        return self.attributed_gpu_s + self.accrued_gpu_s + self.foreign_gpu_s


class OccupancyLedger:
    def __init__(self, gpus: float, now: float):
        if gpus <= 0:
            raise ValueError("gpus must be positive")
        self.gpus = gpus
        self._began = now
        self._last = now
        self._share = 0.0
        self._active: dict[Hashable, float] = {}
        self._foreign_running = 0
        self.attributed_gpu_s = 0.0
        self.foreign_gpu_s = 0.0
        self.idle_gpu_s = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def began(self) -> float:
        return self._began

    @property
    def wall_gpu_s(self) -> float:
        """GPU-seconds the replica has existed for, up to the last event."""
        return (self._last - self._began) * self.gpus

    def advance(self, now: float) -> None:
        """Book the time up to ``now`` (events do this themselves)."""
        self._advance(now)

    def _advance(self, now: float) -> None:
        dt = now - self._last
        if dt <= 0:  # same instant (or a clock that went back): nothing to share
            return
        self._last = now
        local = len(self._active)
        divisor = local + self._foreign_running
        if divisor == 0:
            self.idle_gpu_s += dt * self.gpus
            return
        per_request = dt * self.gpus / divisor
        self._share += per_request
        if divisor > local:
            self.foreign_gpu_s += per_request * (divisor - local)

    def start(self, key: Hashable, now: float) -> None:
        if key in self._active:
            raise ValueError(f"request {key!r} already started on this replica")
        self._advance(now)
        self._active[key] = self._share

    def finish(self, key: Hashable, now: float) -> float:
        """End ``key``'s occupancy; returns the GPU-seconds attributed to it."""
        self._advance(now)
        gpu_s = self._share - self._active.pop(key)
        self.attributed_gpu_s += gpu_s
        return gpu_s

    def accrued(self, key: Hashable, now: float) -> float:
        """GPU-seconds ``key`` has accrued so far (it is still running)."""
        self._advance(now)
        return self._share - self._active[key]

    def observe_running(self, running: int, now: float) -> None:
        """vLLM's own count of running requests, from its /metrics (other gateways' too)."""
        self._advance(now)
        self._foreign_running = max(0, running - len(self._active))

    def snapshot(self, now: float) -> OccupancySnapshot:
        self._advance(now)
        accrued = sum(self._share - start for start in self._active.values())
        return OccupancySnapshot(
            wall_s=self._last - self._began,
            gpus=self.gpus,
            attributed_gpu_s=self.attributed_gpu_s,
            accrued_gpu_s=accrued,
            foreign_gpu_s=self.foreign_gpu_s,
            idle_gpu_s=self.idle_gpu_s,
            in_flight=len(self._active),
        )
