"""One replica's meter: its occupancy ledger, its recent idle ratio and its price."""

from __future__ import annotations

from collections.abc import Hashable
from decimal import Decimal

from metering.money import Ratio, ratio
from metering.occupancy import OccupancyLedger, OccupancySnapshot
from metering.utilisation import UtilisationWindow


class ReplicaMeter:
    def __init__(
        self, *, gpus: float, gpu_hourly_usd: Decimal, now: float, idle_window_s: float = 300.0
    ):
        self.gpu_hourly_usd = gpu_hourly_usd
        self.hourly: Ratio = ratio(gpu_hourly_usd)  # what pricing multiplies by, exactly
        self.ledger = OccupancyLedger(gpus, now)
        self.window = UtilisationWindow(self.ledger, window_s=idle_window_s)

    def start(self, key: Hashable, now: float) -> None:
        self.ledger.start(key, now)

    def finish(self, key: Hashable, now: float) -> float:
        return self.ledger.finish(key, now)

    def idle_per_busy(self, now: float) -> float:
        return self.window.idle_per_busy(now)

    def snapshot(self, now: float) -> OccupancySnapshot:
        return self.ledger.snapshot(now)
