"""tollway_route_decisions_total: routed-alias decisions by tier and score band."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering.prometheus import GatewayMetrics, score_band


@pytest.mark.parametrize(
    ("score", "band"),
    [
        (0.0, "0.0-0.1"),
        (0.05, "0.0-0.1"),
        (0.1, "0.1-0.2"),
        (0.299, "0.2-0.3"),
        (0.95, "0.9-1.0"),
        (1.0, "0.9-1.0"),
        (None, "none"),
    ],
)
def test_score_band_is_a_tenth_wide_and_closed_at_one(score: float | None, band: str) -> None:
    assert score_band(score) == band


def test_route_decisions_are_counted_by_tier_and_band() -> None:
    m = GatewayMetrics()
    m.observe_route("small", 0.12)
    m.observe_route("small", 0.18)
    m.observe_route("large", 0.71)
    m.observe_route("small", None)
    body, _ = m.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {
        (s.labels["tier"], s.labels["band"]): s.value
        for s in families["tollway_route_decisions"].samples
    }
    assert samples == {
        ("small", "0.1-0.2"): 2.0,
        ("large", "0.7-0.8"): 1.0,
        ("small", "none"): 1.0,
    }
