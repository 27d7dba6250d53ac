"""Reading a replica's own load from vLLM's ``/metrics``.

Only three series matter to the gateway: ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``, summed over
engines (data-parallel replicas expose one series per engine). The text is
scanned line by line; no Prometheus client is needed for three gauges.
"""

from __future__ import annotations

from dataclasses import dataclass

WANTED = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


@dataclass(frozen=True, slots=True)
class VllmLoad:
    running: int
    waiting: int
    kv_cache_usage: float  # 0-1; the mean over engines


def parse_vllm_load(text: str) -> VllmLoad | None:
    """The load figures in a /metrics exposition, or None if it has no vLLM gauges."""
    sums = {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}
    counts = dict.fromkeys(sums, 0)
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        key = WANTED.get(name.strip())
        if key is None:
            continue
        value = rest.rsplit("}", 1)[-1].split()[0] if "}" in rest else rest.split()[0]
        try:
            sums[key] += float(value)
        except ValueError:
            continue
        counts[key] += 1
    if not counts["running"]:
        return None
    kv = sums["kv_cache_usage"] / counts["kv_cache_usage"] if counts["kv_cache_usage"] else 0.0
    return VllmLoad(int(sums["running"]), int(sums["waiting"]), kv)
