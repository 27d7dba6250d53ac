"""Replica pools: which replicas serve a tier, how busy and how available each is.

A ``ReplicaState`` is the gateway's live view of one vLLM replica: requests
it has in flight there, whether it is healthy and whether it is ejected.
Replicas are keyed by URL: when two tiers are served by one vLLM process
(several ``--served-model-name`` aliases) they share one state, because slots
and GPU time belong to the process, not to the tier.

Two signals take a replica out of service:

- *unhealthy*: active checks (``gateway.health``) failed ``unhealthy_after``
  times in a row; back on the first passing check.
- *ejected*: passive outlier detection. Upstream attempts failed
  ``eject_after`` times in a row (a refused connection at once); out for
  ``ejection_s``, doubled on each ejection without a success in between (up to
  ``max_ejection_s``), then re-admitted and tried again.

Slots: ``max_num_seqs`` minus the gateway's own in-flight requests minus
*foreign* load, the requests vLLM reports (running + waiting) beyond ours,
sent by other gateway processes. Foreign load is read once a second from
vLLM's ``/metrics``, against the most this gateway had in flight while the
scrape was under way, so our own requests finishing mid-scrape are never
mistaken for someone else's.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from gateway.config import HealthConfig, Replica, Settings, Tier
from gateway.scrape import VllmLoad
from metering.replica import ReplicaMeter

_attempt_ids = itertools.count()


@dataclass(eq=False)
class ReplicaState:
    config: Replica
    meter: ReplicaMeter
    in_flight: int = 0
    healthy: bool = True  # active checks
    failed_checks: int = 0
    consecutive_failures: int = 0  # upstream attempts (passive)
    ejected_until: float = 0.0  # monotonic; ejected while now < this
    ejections: int = 0  # ejections since the last success
    last_error: str | None = None
    vllm: VllmLoad | None = None  # the replica's own view, scraped from /metrics
    foreign: int = 0  # requests at vLLM that are not ours (other gateways)
    _scrape_peak: int = 0  # most in flight since the current scrape began
    url: str = field(init=False)  # the config's, as a field: read on every request

    def __post_init__(self) -> None:
        self.url = self.config.url

    def begin_scrape(self) -> None:
        self._scrape_peak = self.in_flight

    def observe_vllm(self, load: VllmLoad) -> None:
        self.vllm = load
        self.foreign = max(0, load.running + load.waiting - self._scrape_peak)
        self.meter.ledger.observe_running(load.running, time.monotonic())

    def occupy(self) -> int:
        """A request (attempt) starts here: count it and start its GPU-time share."""
        key = next(_attempt_ids)
        self.in_flight += 1
        if self.in_flight > self._scrape_peak:
            self._scrape_peak = self.in_flight
        self.meter.start(key, time.monotonic())
        return key

    def vacate(self, key: int) -> float:
        """It ended: returns the GPU-seconds it was attributed."""
        self.in_flight -= 1
        return self.meter.finish(key, time.monotonic())

    @property
    def slots(self) -> int:
        return self.config.max_num_seqs

    @property
    def free_slots(self) -> int:
        return self.config.max_num_seqs - self.in_flight - self.foreign

    @property
    def load(self) -> float:
        """How busy, for choosing among replicas with a free slot (lower is better).

        In-flight over slots, counting other gateways' requests, then refined by
        vLLM's own view: its waiting queue (should be empty) and KV-cache use, so
        that of two equally full replicas the one with more KV room wins.
        """
        ratio = (self.in_flight + self.foreign) / self.config.max_num_seqs
        vllm = self.vllm
        if vllm is not None:
            ratio += vllm.waiting / self.config.max_num_seqs + 0.25 * vllm.kv_cache_usage
        return ratio

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def check_passed(self) -> None:
        self.failed_checks = 0
        self.healthy = True

    def check_failed(self, reason: str, *, unhealthy_after: int) -> None:
        self.failed_checks += 1
        self.last_error = reason
        if self.failed_checks >= unhealthy_after:
            self.healthy = False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.ejections = 0
        self.last_error = None

    def record_failure(
        self, reason: str, config: HealthConfig, now: float, *, at_once: bool = False
    ) -> float:
        """An upstream attempt failed; returns the ejection's length in seconds (0: none)."""
        self.consecutive_failures += 1
        self.last_error = reason
        if not at_once and self.consecutive_failures < config.eject_after:
            return 0.0
        if self.ejected(now):
            return 0.0  # already out (a request that was in flight when it was ejected)
        duration = min(config.ejection_s * 2.0**self.ejections, config.max_ejection_s)
        self.ejections += 1
        self.consecutive_failures = 0
        self.ejected_until = now + duration
        return duration


@dataclass(eq=False)
class TierPool:
    tier: Tier
    replicas: list[ReplicaState] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.tier.name

    def available(self, now: float) -> list[ReplicaState]:
        return [r for r in self.replicas if r.available(now)]

    def best_free(self, now: float, exclude: frozenset[int] = frozenset()) -> ReplicaState | None:
        """The least-loaded available replica with a free slot, untried ones first."""
        best: ReplicaState | None = None
        best_key: tuple[bool, float] | None = None
        for replica in self.replicas:
            if replica.free_slots <= 0 or not replica.available(now):
                continue
            key = (id(replica) in exclude, replica.load)
            if best_key is None or key < best_key:
                best, best_key = replica, key
        return best


class Pools:
    """Every tier's pool, built once from settings and owned by the app."""

    def __init__(self, settings: Settings):
        self.tiers: dict[str, TierPool] = {}
        self.by_url: dict[str, ReplicaState] = {}
        now = time.monotonic()
        for tier in settings.tiers:
            pool = TierPool(tier)
            for replica in tier.replicas:
                state = self.by_url.get(replica.url)
                if state is None:
                    meter = ReplicaMeter(
                        gpus=replica.gpus,
                        gpu_hourly_usd=Decimal(str(replica.gpu_hourly_usd)),
                        now=now,
                        idle_window_s=settings.metering.idle_window_s,
                    )
                    state = self.by_url[replica.url] = ReplicaState(replica, meter)
                pool.replicas.append(state)
            self.tiers[tier.name] = pool
        # A replica's ``tier`` label: the tiers it serves joined with "+" (one vLLM
        # process under several aliases is one replica, exported once).
        self.tier_label = {
            url: "+".join(p.name for p in self.tiers.values() if state in p.replicas)
            for url, state in self.by_url.items()
        }

    def __iter__(self) -> Iterator[TierPool]:
        return iter(self.tiers.values())

    def replicas(self) -> Iterator[ReplicaState]:
        return iter(self.by_url.values())
