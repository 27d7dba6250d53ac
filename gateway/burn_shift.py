"""Budget-aware routing: shift the complexity cut points while spend runs hot.

Every metered request's loaded cost feeds a burn-rate window for the whole
gateway and one for its tenant (``metering.burn``). When a configured target
(``routing.burn_target_usd_per_hour``, ``routing.tenant_burn_targets``) is
exceeded, ``router.tiers.shift_cut_points`` raises the cut points, sending
more traffic to cheaper tiers, by up to ``routing.max_shift``; the larger of
the gateway's and the tenant's shifts wins. When spend falls back under
target, the cut points return. The shift is reported in
``x-tollway-route-shift`` and the rates in ``tollway_burn_rate_usd_per_hour``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.config import RoutingConfig
from metering.burn import BurnRate
from metering.prometheus import GatewayMetrics
from metering.report import RequestReport
from router.tiers import shift_cut_points


class BurnShift:
    def __init__(self, config: RoutingConfig, metrics: GatewayMetrics):
        self.config = config
        self.metrics = metrics
        self.gateway = BurnRate(config.burn_window_s)
        self.tenants = {t: BurnRate(config.burn_window_s) for t in config.tenant_burn_targets}

    @property
    def active(self) -> bool:
        return bool(self.config.burn_target_usd_per_hour or self.config.tenant_burn_targets)

    def record(self, report: RequestReport) -> None:
        if not self.active or not report.cost.loaded:
            return
        now = time.monotonic()
        self.gateway.add(report.cost.loaded, now)
        tenant = self.tenants.get(report.tenant)
        if tenant is not None:
            tenant.add(report.cost.loaded, now)

    def cut_points(self, tenant: str, base: Sequence[float]) -> tuple[list[float], float]:
        """The cut points to use for ``tenant`` now, and how far they moved (0 = not)."""
        if not self.active:
            return list(base), 0.0
        now = time.monotonic()
        candidates = [list(base)]
        gateway_rate = self.gateway.usd_per_hour(now)
        self.metrics.observe_burn("gateway", gateway_rate)
        target = self.config.burn_target_usd_per_hour
        candidates.append(shift_cut_points(base, gateway_rate, target, self.config.max_shift))
        window = self.tenants.get(tenant)
        if window is not None:
            rate = window.usd_per_hour(now)
            self.metrics.observe_burn(tenant, rate)
            own = self.config.tenant_burn_targets[tenant]
            candidates.append(shift_cut_points(base, rate, own, self.config.max_shift))
        shifted = max(candidates, key=lambda cuts: sum(cuts))
        return shifted, max((a - b for a, b in zip(shifted, base, strict=True)), default=0.0)
