"""The burn-rate window: dollars per hour over the last window_s."""

from __future__ import annotations

import pytest

from metering.burn import BurnRate


def test_rate_is_spend_in_window_scaled_to_an_hour() -> None:
    burn = BurnRate(window_s=60, bucket_s=5)
    burn.add(0.5, now=1000.0)
    burn.add(0.5, now=1030.0)
    assert burn.usd_per_hour(1031.0) == pytest.approx(1.0 * 60)  # $1 a minute


def test_old_spend_leaves_the_window() -> None:
    burn = BurnRate(window_s=60, bucket_s=5)
    burn.add(1.0, now=1000.0)
    burn.add(2.0, now=1050.0)
    assert burn.usd_per_hour(1100.0) == pytest.approx(2.0 * 60)
    assert burn.usd_per_hour(1200.0) == 0


def test_bad_window() -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        BurnRate(window_s=1, bucket_s=5)
