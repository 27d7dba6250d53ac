"""The app's long-lived parts, built from settings and owned by its lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.auth import Authenticator
from gateway.config import Settings
from gateway.health import HealthChecker
from gateway.meter import Meter
from gateway.pipeline import Pipeline
from gateway.pool import Pools
from gateway.upstream import UpstreamClient
from router.table import RouteTable


@dataclass(eq=False)
class Services:
    settings: Settings
    auth: Authenticator
    routes: RouteTable
    pools: Pools
    upstream: UpstreamClient
    pipeline: Pipeline
    health: HealthChecker | None = None
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        auth = Authenticator(settings.auth)
        routes = RouteTable(
            {t.name: t.models for t in settings.tiers},
            settings.routing.aliases,
            settings.routing.default_tier,
        )
        pools = Pools(settings)
        upstream = UpstreamClient(settings.upstream, settings.health)
        meter = Meter(settings)
        pipeline = Pipeline(
            auth=auth,
            routes=routes,
            pools=pools,
            upstream=upstream,
            meter=meter,
            max_body_bytes=settings.limits.max_body_bytes,
        )
        return cls(settings, auth, routes, pools, upstream, pipeline)

    async def start(self) -> None:
        await self.upstream.start()
        self.health = HealthChecker(self.pools, self.settings.health, self.upstream.session)
        await self.health.check_all(unhealthy_after=1)
        self.health.start()

    async def stop(self) -> None:
        if self.health is not None:
            await self.health.stop()
        await self.upstream.close()
