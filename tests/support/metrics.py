"""Reading a Prometheus exposition in tests: every sample, then sums by name and labels."""

from __future__ import annotations

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# The tests' gateways' ``ops.metrics_token`` (``tests.conftest.gateway_config``): /metrics
# and the detailed /ready answer to it only.
METRICS_TOKEN = "metrics-token-for-tests-0001"
OPS_HEADERS = {"authorization": f"Bearer {METRICS_TOKEN}"}


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metrics_text(base_url: str) -> str:
    """``GET {base_url}/metrics`` with the tests' metrics token."""
    response = httpx.get(base_url + "/metrics", headers=OPS_HEADERS, timeout=10)
    response.raise_for_status()
    return response.text


def scrape(base_url: str) -> Samples:
    """``GET {base_url}/metrics`` with the tests' metrics token, parsed."""
    return parse(metrics_text(base_url))


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )  # fmt: skip
