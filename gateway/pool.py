"""Replica pools: which replicas serve a tier, how busy and how healthy each is.

A ``ReplicaState`` is the gateway's live view of one vLLM replica: requests
it has in flight there and whether the replica is healthy. Replicas are keyed
by URL: when two tiers are served by one vLLM process (several
``--served-model-name`` aliases) they share one state, because slots and GPU
time belong to the process, not to the tier. Active checks
(``gateway.health``) and passive signals from the upstream client (a refused
connection) both feed ``healthy``. ``TierPool.pick`` chooses the healthy
replica with the lowest in-flight / slots ratio.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from gateway.config import Replica, Settings, Tier
from gateway.scrape import VllmLoad
from metering.replica import ReplicaMeter

_attempt_ids = itertools.count()


@dataclass(eq=False)
class ReplicaState:
    config: Replica
    meter: ReplicaMeter
    in_flight: int = 0
    healthy: bool = True
    consecutive_failures: int = 0
    last_error: str | None = None
    vllm: VllmLoad | None = None  # the replica's own view, scraped from /metrics

    def observe_vllm(self, load: VllmLoad) -> None:
        self.vllm = load
        self.meter.ledger.observe_running(load.running, time.monotonic())

    def occupy(self) -> int:
        """A request (attempt) starts here: count it and start its GPU-time share."""
        key = next(_attempt_ids)
        self.in_flight += 1
        self.meter.start(key, time.monotonic())
        return key

    def vacate(self, key: int) -> float:
        """It ended: returns the GPU-seconds it was attributed."""
        self.in_flight -= 1
        return self.meter.finish(key, time.monotonic())

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def load(self) -> float:
        return self.in_flight / self.config.max_num_seqs

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.last_error = None
        self.healthy = True

    def record_failure(self, reason: str, *, unhealthy_after: int) -> None:
        self.consecutive_failures += 1
        self.last_error = reason
        if self.consecutive_failures >= unhealthy_after:
            self.healthy = False


@dataclass(eq=False)
class TierPool:
    tier: Tier
    replicas: list[ReplicaState] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.tier.name

    def healthy(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.healthy]

    def pick(self, exclude: Iterable[ReplicaState] = ()) -> ReplicaState | None:
        """The least-loaded healthy replica, preferring ones not in ``exclude``."""
        tried = set(map(id, exclude))
        best: ReplicaState | None = None
        best_key: tuple[bool, float] | None = None
        for replica in self.replicas:
            if not replica.healthy:
                continue
            key = (id(replica) in tried, replica.load)
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

    def __iter__(self) -> Iterator[TierPool]:
        return iter(self.tiers.values())

    def replicas(self) -> Iterator[ReplicaState]:
        return iter(self.by_url.values())
