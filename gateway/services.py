"""The app's long-lived parts, built from settings and owned by its lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cache.idempotency import IdempotencyStore
from cache.redis_client import RedisClient
from cache.response_cache import ResponseCache
from cache.singleflight import SingleFlight
from cache.spend import SpendCounters
from gateway.admission import Scheduler
from gateway.auth import Authenticator
from gateway.budgets import BudgetGuard
from gateway.burn_shift import BurnShift
from gateway.caching import CacheLayer
from gateway.config import Settings
from gateway.health import HealthChecker
from gateway.idempotent import IdempotencyLayer
from gateway.meter import Meter
from gateway.pipeline import Pipeline
from gateway.pool import Pools
from gateway.recorder import Recorder
from gateway.serving import Serving
from gateway.settle import Settlement
from gateway.spend_watch import SpendWatch
from gateway.tickets import TicketOffice
from gateway.upstream import UpstreamClient
from ledger.database import Pool, check_schema, open_pool
from ledger.writer import LedgerWriter
from metering.estimate import CostEstimator
from metering.prometheus import GatewayMetrics, ReplicaGpu
from metering.report import RequestReport
from metering.telemetry import Telemetry
from router.score import ComplexityScorer
from router.table import RouteTable

log = logging.getLogger("tollway.services")


@dataclass(eq=False)
class Services:
    settings: Settings
    auth: Authenticator
    routes: RouteTable
    pools: Pools
    scheduler: Scheduler
    upstream: UpstreamClient
    pipeline: Pipeline
    metrics: GatewayMetrics
    telemetry: Telemetry
    redis: RedisClient
    ledger: LedgerWriter | None  # None: no database configured
    spend: SpendCounters
    budgets: BudgetGuard
    recorder: Recorder
    health: HealthChecker | None = None
    database: Pool | None = None  # opened by start() when settings.database is set
    spend_watch: SpendWatch | None = None  # with a database: counters Redis lost, rebuilt
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        auth = Authenticator(settings.auth)
        routing = settings.routing
        scorer = None
        if routing.cut_points is not None:
            weights = Path(routing.weights_file) if routing.weights_file else None
            scorer = ComplexityScorer.load(weights)
        routes = RouteTable(
            {t.name: t.models for t in settings.tiers},
            routing.aliases,
            routing.default_tier,
            scorer=scorer,
            cut_points=routing.cut_points,
        )
        pools = Pools(settings)
        metrics = GatewayMetrics()
        metrics.register_replica_source(lambda: replica_gpu(pools))
        scheduler = Scheduler(pools, settings.scheduling, settings.health, metrics)
        tickets = TicketOffice(settings.scheduling, {t.name: t.priority for t in settings.tiers})
        upstream = UpstreamClient(settings.upstream, scheduler, metrics.observe_attempt)
        telemetry = (
            Telemetry(None)
            if not settings.metering.enabled
            else Telemetry.from_env(
                record_content=settings.telemetry.record_content,
                on_failure=metrics.telemetry_failure,
            )
        )
        redis = RedisClient(
            settings.redis.url,
            call_budget_s=settings.redis.call_budget_ms / 1000,
            on_failure=metrics.redis_failure,
            cluster=settings.redis.cluster,
        )
        ledger = None
        if settings.database is not None:
            ledger = LedgerWriter(
                settings.ledger,
                on_written=metrics.ledger_rows_written,
                on_dropped=lambda n: metrics.ledger_rows_dropped("spool_full", n),
                on_rejected=lambda n: metrics.ledger_rows_dropped("rejected", n),
            )
            metrics.register_spool_source(lambda: ledger.waiting if ledger else 0)
        # Budgets and rate limits get their own client: a cache lookup that times out
        # under load (50 ms budget) opens the shared client's short circuit for a
        # second, and limits must not fail open for that. Their calls wait up to 1 s.
        spend = SpendCounters(
            RedisClient(
                settings.redis.url,
                call_budget_s=max(1.0, settings.redis.call_budget_ms / 1000),
                on_failure=metrics.redis_failure,
                cluster=settings.redis.cluster,
            )
        )
        meter = Meter(settings)
        estimator = CostEstimator(
            meter.token_prices,
            meter.overhead,
            unobserved_usd_per_mtok=settings.reservations.unobserved_usd_per_mtok,
            floor_usd_per_mtok=settings.reservations.floor_usd_per_mtok,
            price_gpu=lambda tier, gpu_us: meter.dearest(pools.tiers[tier].replicas, gpu_us),
            margin=settings.reservations.margin,
        )
        hold_s = settings.reservations.hold_s or settings.upstream.total_timeout_s + 30
        budgets = BudgetGuard(
            settings.budgets,
            settings.reservations,
            spend,
            estimator,
            hold_s=hold_s,
            output_caps={t.name: t.max_output_tokens for t in settings.tiers},
            rate_limits=settings.rate_limits,
            on_unchecked=metrics.budget_unchecked,
        )
        cache = ResponseCache(
            redis,
            default_ttl_s=settings.cache.default_ttl_s,
            max_entry_bytes=settings.cache.max_entry_bytes,
            put_budget_s=max(0.5, settings.redis.call_budget_ms / 1000),
        )
        flights = SingleFlight(redis, lease_s=settings.cache.coalesce_wait_s)
        policies = {t.name: t.cache for t in settings.tiers}
        caching = CacheLayer(cache, settings.cache, policies, flights, metrics.cache_event)
        idempotency_store = IdempotencyStore(
            redis, ttl_s=settings.idempotency.ttl_s, lease_s=settings.idempotency.lease_s
        )
        burn = BurnShift(settings.routing, metrics)
        consumers = [metrics.observe_requests, spend.add_many]
        if ledger is not None:
            consumers.append(ledger.record_many)
        recorder = Recorder(
            consumers,
            # How often rows reach the spool on disk: what a SIGKILL can lose at most.
            linger_s=settings.ledger.sync_interval_s,  # /metrics drains it before a scrape
        )
        sinks = [estimator.observe]  # at once: the next reservation and route read them
        if burn.active:
            sinks.append(burn.record)
        idempotency = IdempotencyLayer(idempotency_store, settings.idempotency)
        serving = Serving(
            pools=pools,
            scheduler=scheduler,
            upstream=upstream,
            meter=meter,
            budgets=budgets,
            caching=caching,
            idempotency=idempotency,
        )
        settlement = Settlement(meter, recorder, count_refused(metrics), sinks)
        limits = settings.limits
        pipeline = Pipeline(
            auth=auth,
            routes=routes,
            tickets=tickets,
            telemetry=telemetry,
            caching=caching,
            burn=burn,
            serving=serving,
            settlement=settlement,
            max_body_bytes=limits.max_body_bytes,
            body_read_timeout_s=limits.body_read_timeout_s,
            tiers=frozenset(pools.tiers),
            count_route=metrics.observe_route,
        )
        return cls(
            settings, auth, routes, pools, scheduler, upstream, pipeline, metrics, telemetry,
            redis, ledger, spend, budgets, recorder,
        )  # fmt: skip

    async def start(self) -> None:
        database = self.settings.database
        checked = False
        if database is not None:
            # A schema this code does not know stops the start (SchemaError); a
            # database that does not answer does not: rows wait in the spool.
            checked = await check_schema(database) is not None
            self.database = await open_pool(database)
        await self.auth.start(self.database)
        await self.redis.start()
        await self.spend.redis.start()
        if self.ledger is not None:
            await self.ledger.start(self.database, schema_checked=checked)
        await self.spend.start()
        if self.database is not None:  # budgets read the counters, which Redis may lose
            self.spend_watch = SpendWatch(
                self.spend, self.database, interval_s=self.settings.ledger.counters_check_s
            )
            if checked:  # (a database down at start: the watch rebuilds when it answers)
                await self.spend_watch.rebuild()
            self.spend_watch.start()
        await self.recorder.start()
        await self.upstream.start()
        self.health = HealthChecker(
            self.pools, self.settings.health, self.upstream.session, self.scheduler.refresh
        )
        await self.health.check_all(unhealthy_after=1)
        self.health.start()

    async def stop(self) -> None:
        if self.health is not None:
            await self.health.stop()
        self.scheduler.close()
        await self.upstream.close()
        if self.spend_watch is not None:
            await self.spend_watch.stop()
        await self.recorder.stop()  # hands the last requests to the ledger and the metrics
        if self.ledger is not None:
            await self.ledger.stop()  # spools all, writes what the database takes in time
        await self.spend.stop()
        await self.redis.close()
        await self.spend.redis.close()
        await self.auth.stop()
        if self.database is not None:
            await self.database.close()
        self.telemetry.shutdown()


def count_refused(metrics: GatewayMetrics) -> Callable[[RequestReport], None]:
    """A request refused before any work (401, 400...): counted at once, no ledger row."""

    def count(report: RequestReport) -> None:
        metrics.observe_requests([report])

    return count


def replica_gpu(pools: Pools) -> list[ReplicaGpu]:
    """Each replica's GPU time for /metrics; a process serving several tiers is one replica."""
    now = time.monotonic()
    return [
        ReplicaGpu.from_occupancy(
            url,
            pools.tier_label[url],
            replica.meter.snapshot(now),
            healthy=replica.healthy,
            slots=replica.config.max_num_seqs,
            ejected=replica.ejected(now),
        )
        for url, replica in pools.by_url.items()
    ]
