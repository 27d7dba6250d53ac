"""vLLM's engine metrics: the numbers, and their Prometheus text exposition.

`EngineMetrics` holds the counters and histograms the engine updates; `render`
writes them, plus the gauges read from the engine at scrape time, in the text
format `prometheus_client` produces for vLLM (written here by hand so the
simulator has no dependency for it):

- metric and label names as in vLLM's `vllm/v1/metrics/loggers.py`, labels
  `engine="0"` and `model_name="<first served name>"`, sorted by name as
  `prometheus_client` sorts them;
- counters exposed with the `_total` suffix in `# HELP`/`# TYPE` and samples;
- histograms with vLLM's bucket boundaries, cumulative `_bucket{le=...}` lines
  ending in `+Inf`, then `_count` and `_sum`;
- every `finished_reason` label value present from the start, at 0.
"""

from __future__ import annotations

import math
from bisect import bisect_left

# Bucket boundaries copied from vLLM's PrometheusStatLogger.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")


class Histogram:
    """Per-bucket counts (not cumulative until rendered), sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is the +Inf bucket
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound in that bound's bucket: `le` is inclusive.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class EngineMetrics:
    """Everything behind vLLM's counters and histograms, updated by the engine."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.request_success = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prefill = Histogram(REQUEST_LATENCY_BUCKETS)
        self.decode = Histogram(REQUEST_LATENCY_BUCKETS)

    def record_instant(self, reason: str) -> None:
        """A request that took no time at all (zero-delay mode): every latency is 0."""
        self.request_success[reason] += 1
        for hist in (self.ttft, self.e2e, self.queue, self.prefill, self.decode):
            hist.counts[0] += 1  # 0 s falls in the first bucket; the sum does not move
            hist.count += 1

    def record_finished(
        self, reason: str, *, e2e: float, queue: float, prefill: float, decode: float
    ) -> None:
        self.request_success[reason] += 1
        self.e2e.observe(e2e)
        self.queue.observe(queue)
        self.prefill.observe(prefill)
        self.decode.observe(decode)


def _num(value: float) -> str:
    # prometheus_client prints floats the Go way: 1 -> "1.0", infinity -> "+Inf".
    return "+Inf" if value == math.inf else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# (name, help) of the gauges; (name, EngineMetrics attribute, help) of the rest.
_GAUGES: tuple[tuple[str, str], ...] = (
    ("vllm:num_requests_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "vllm:prefix_cache_queries_total",
        "prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
    ),
    (
        "vllm:prefix_cache_hits_total",
        "prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
    ),
    (
        "vllm:num_preemptions_total",
        "preemptions",
        "Cumulative number of preemption from the engine.",
    ),
    ("vllm:prompt_tokens_total", "prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "generation_tokens", "Number of generation tokens processed."),
)
_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("vllm:time_to_first_token_seconds", "ttft", "Histogram of time to first token in seconds."),
    ("vllm:e2e_request_latency_seconds", "e2e", "Histogram of e2e request latency in seconds."),
    (
        "vllm:request_queue_time_seconds",
        "queue",
        "Histogram of time spent in WAITING phase for request.",
    ),
    (
        "vllm:request_prefill_time_seconds",
        "prefill",
        "Histogram of time spent in PREFILL phase for request.",
    ),
    (
        "vllm:request_decode_time_seconds",
        "decode",
        "Histogram of time spent in DECODE phase for request.",
    ),
)


def render(
    metrics: EngineMetrics,
    *,
    model_name: str,
    running: int,
    waiting: int,
    kv_cache_usage: float,
) -> str:
    model = f'model_name="{_escape(model_name)}"'
    labels = f'engine="0",{model}'
    out: list[str] = []

    def head(name: str, kind: str, doc: str) -> None:
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")

    for (name, doc), value in zip(_GAUGES, (running, waiting, kv_cache_usage), strict=True):
        head(name, "gauge", doc)
        out.append(f"{name}{{{labels}}} {_num(value)}")
    for name, attr, doc in _COUNTERS:
        head(name, "counter", doc)
        out.append(f"{name}{{{labels}}} {_num(getattr(metrics, attr))}")
    name = "vllm:request_success_total"
    head(name, "counter", "Count of successfully processed requests.")
    for reason, n in metrics.request_success.items():
        out.append(f'{name}{{engine="0",finished_reason="{reason}",{model}}} {_num(n)}')
    for name, attr, doc in _HISTOGRAMS:
        hist: Histogram = getattr(metrics, attr)
        head(name, "histogram", doc)
        cumulative = 0
        for bound, n in zip((*hist.bounds, math.inf), hist.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{engine="0",le="{_num(bound)}",{model}}} {_num(cumulative)}')
        out.append(f"{name}_count{{{labels}}} {_num(hist.count)}")
        out.append(f"{name}_sum{{{labels}}} {_num(hist.sum)}")
    out.append("")
    return "\n".join(out)
