"""The gateway's Prometheus metrics: what ``/metrics`` exposes, and the cheap calls that feed it.

``GatewayMetrics`` owns its own ``CollectorRegistry`` (never the process-wide
default), so several gateways, or tests, can live in one process. The
gateway hands ``observe_requests`` its finished requests' ``RequestReport``s a
batch at a time, calls ``observe_attempt`` once per upstream try, and the other
methods from the scheduler, cache and ledger; ``render()`` is the body of
``GET /metrics``. Dashboards, alert rules and the autoscaler query the names
below, so they are an interface: rename nothing without migrating those.

Metrics (every name is prefixed ``tollway_``; units are in the names)::

  name                                type       labels
  requests_total                      counter    tier, model, tenant, status, cache
  tokens_total                        counter    tier, model, tenant, cache, kind
  cached_prompt_tokens_total          counter    tier, model, tenant, cache
  gpu_seconds_total                   counter    tier, model, tenant
  cost_marginal_usd_total             counter    tier, model, tenant
  cost_loaded_usd_total               counter    tier, model, tenant
  cost_saved_usd_total                counter    tier, model, tenant, cache
  request_duration_seconds            histogram  tier, model, cache
  time_to_first_token_seconds         histogram  tier, model, cache
  upstream_requests_total             counter    tier
  upstream_attempts_total             counter    tier, replica, outcome
  replica_gpu_seconds_total           counter    replica, tier, state
  replica_in_flight                   gauge      replica, tier
  replica_slots                       gauge      replica, tier
  replica_healthy                     gauge      replica, tier
  replica_ejected                     gauge      replica, tier
  replica_ejections_total             counter    replica, tier
  burn_rate_usd_per_hour              gauge      scope ("gateway" or a tenant)
  queue_depth                         gauge      tier
  queue_wait_seconds                  histogram  tier
  shed_total                          counter    tier, reason
  fallbacks_total                     counter    from_tier, to_tier, reason
  cache_requests_total                counter    tier, result
  redis_failures_total                counter    operation
  ledger_writes_lost_total            counter    (none)
  telemetry_failures_total            counter    kind
  route_decisions_total               counter    tier, band

- ``requests_total``: finished requests, one per client request (hits,
  replays and errors included). ``status`` is the HTTP status sent
  ("200", "429"...); ``cache`` is miss|hit|bypass|coalesced|replay.
- ``tokens_total``: ``kind`` is prompt|completion, the usage the response
  carried (OpenAI's names; OTel's input|output). Tokens of a cache hit or
  replay were not computed again: ``cache=~"miss|bypass"`` is what the GPUs
  did, the sum over ``cache`` is what clients received.
- ``cached_prompt_tokens_total``: the prompt tokens vLLM's prefix cache
  served (a subset of ``kind="prompt"``, so a separate metric: a sum over
  ``kind`` stays meaningful).
- ``gpu_seconds_total``: GPU-seconds attributed to requests
  (``metering.occupancy``), booked when each request finishes.
- ``cost_marginal_usd_total`` / ``cost_loaded_usd_total``: dollars, the
  ``x-tollway-cost-usd`` and ``x-tollway-cost-loaded-usd`` headers summed.
  Loaded includes marginal, hence two metrics rather than a ``kind`` label.
- ``cost_saved_usd_total``: what hits and replays would have cost
  (``RequestReport.saved``); ``cache`` says which.
- ``request_duration_seconds``: arrival to last byte. ``time_to_first_token_seconds``:
  arrival to the first content byte, when there was one. Neither has a tenant
  label: buckets multiply series, and latency is a property of tier and model.
- ``upstream_requests_total``: requests that made at least one upstream
  attempt (``RequestReport.attempts > 0``), counted once each.
- ``upstream_attempts_total``: every try, ``outcome`` ok|connect_error|
  timeout|status_5xx|... (the upstream client's words).
- ``replica_gpu_seconds_total``: one replica's GPU time since the gateway
  started, split by ``state``: busy (this gateway's requests, finished and
  running), foreign (other gateways' requests, seen in vLLM's running count)
  and idle. The three add up to wall time x GPUs. Read from a callback at
  scrape time (``register_replica_source``), not pushed: the occupancy ledger
  already keeps the running totals, so the hot path pays nothing and the
  values are as fresh as the scrape. When one vLLM process serves several
  tiers, its ``tier`` label is the tier names joined with "+", so it is
  exported once and never double-counted.
- ``replica_in_flight``, ``replica_slots`` (``max_num_seqs``), ``replica_healthy``
  (1 or 0): from the same callback.
- ``replica_ejected`` (1 while passive outlier detection keeps a replica out)
  and ``replica_ejections_total``.
- ``queue_depth`` and ``queue_wait_seconds``: the admission scheduler's queue,
  per tier (scale on ``queue_depth``); every admitted request observes its
  wait, 0 when a slot was free.
- ``shed_total``: requests refused by admission, ``reason`` deadline (its wait
  would outlast, or outlasted, its deadline) | queue_full | no_replica.
  ``fallbacks_total``: requests served by another tier than routed, ``reason``
  unavailable | deadline.
- ``route_decisions_total``: requests for a routed alias (``auto``), by the
  tier chosen and the complexity score's band of width 0.1 ("0.2-0.3"), or
  ``band="none"`` when no score decided (no cut points configured).
- ``cache_requests_total``: response-cache decisions, ``result`` hit|miss|
  bypass (not looked up: policy or Cache-Control); a miss answered by an
  identical request in flight also counts as coalesced.
- ``redis_failures_total``, ``ledger_writes_lost_total`` and
  ``telemetry_failures_total``: the fail-open paths, counted.

PromQL::

  # retry inflation: upstream attempts per unique upstream-bound request (1.0 = no retries)
  sum by (tier) (rate(tollway_upstream_attempts_total[5m]))
    / sum by (tier) (rate(tollway_upstream_requests_total[5m]))

  # replica GPU utilisation: busy / (busy + idle), foreign counted as busy
  1 - sum by (replica) (rate(tollway_replica_gpu_seconds_total{state="idle"}[5m]))
    / sum by (replica) (rate(tollway_replica_gpu_seconds_total[5m]))

  # dollars per hour by tenant
  3600 * sum by (tenant) (rate(tollway_cost_marginal_usd_total[5m]))

Several gateways each report every replica from their own view (one's
foreign time is the others' busy time), so the utilisation above is already
the whole replica's, averaged over gateways; sum ``state="busy"`` over
gateways for the GPU time their requests used, never ``idle`` or ``foreign``.

Cardinality: no request ids, keys or free text. Tier, replica, status, cache,
outcome, operation and kind come from configuration or code. Tenants and
models are capped (``max_tenants``, ``max_models``): past the cap a new value
is labelled ``other``. An empty value (a request refused before auth or
routing) is labelled ``none``. No ``_created`` series (they would double the
series count of every counter).

Cost on the hot path: the counters and histograms are plain numbers in cells
found by one dict lookup per request, turned into metric families only at
scrape time (``metering.prom_cells``). Everything, ``render()`` included, runs
on the event loop's thread (serve ``/metrics`` from an ``async def`` route):
the replica source advances the occupancy ledgers, which the loop also writes.

OpenTelemetry GenAI conventions (``gen_ai.*``, development status) map as:
``gen_ai.client.token.usage`` (histogram by ``gen_ai.token.type``
input|output) -> ``tollway_tokens_total{kind="prompt|completion"}``, a
counter because rates and sums by tenant are what is queried;
``gen_ai.usage.cache_read.input_tokens`` -> ``tollway_cached_prompt_tokens_total``;
``gen_ai.client.operation.duration`` / ``gen_ai.server.request.duration`` ->
``tollway_request_duration_seconds``; ``gen_ai.server.time_to_first_token``
(``gen_ai.client.operation.time_to_first_chunk``) ->
``tollway_time_to_first_token_seconds``; ``gen_ai.request.model`` -> ``model``;
``error.type`` -> ``status``. The names stay Prometheus-style and prefixed so
they never collide with an OTel SDK exporting ``gen_ai_*`` from the same process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from metering.batch import chunks, grouped
from metering.money import NANOS_PER_USD
from metering.occupancy import OccupancySnapshot
from metering.prom_cells import INF, NONE, OTHER, Capped, Families, HistVec, Vec
from metering.report import FREE, MICROS, RequestReport

log = logging.getLogger(__name__)

# Seconds. LLM requests run from a cache hit (milliseconds) to a long generation (minutes).
DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, INF)
TTFT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 120, INF)
QUEUE_WAIT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, INF)


@dataclass(frozen=True, slots=True)
class ReplicaGpu:
    """One replica's cumulative GPU time as one gateway sees it, read at scrape time."""

    replica: str
    tier: str  # tiers joined with "+" when one vLLM process serves several
    busy_gpu_s: float  # this gateway's requests, finished and running
    idle_gpu_s: float
    foreign_gpu_s: float
    in_flight: int
    healthy: bool
    slots: int = 0  # max_num_seqs; 0 = unknown, not exported
    ejected: bool = False

    @classmethod
    def from_occupancy(
        cls,
        replica: str,
        tier: str,
        snap: OccupancySnapshot,
        *,
        healthy: bool,
        slots: int = 0,
        ejected: bool = False,
    ) -> ReplicaGpu:
        return cls(
            replica=replica,
            tier=tier,
            busy_gpu_s=snap.attributed_gpu_s + snap.accrued_gpu_s,
            idle_gpu_s=snap.idle_gpu_s,
            foreign_gpu_s=snap.foreign_gpu_s,
            in_flight=snap.in_flight,
            healthy=healthy,
            slots=slots,
            ejected=ejected,
        )


def score_band(score: float | None) -> str:
    """The band of width 0.1 holding ``score`` ("0.2-0.3"); 1.0 is in the top one."""
    if score is None:
        return NONE
    low = min(int(max(score, 0.0) * 10), 9)
    return f"{low / 10:.1f}-{(low + 1) / 10:.1f}"


ReplicaSource = Callable[[], Iterable[ReplicaGpu]]


class _ReplicaCollector:
    """Per-replica GPU time, in-flight, slots and health, from the gateway's callback."""

    def __init__(self, on_error: Callable[[], None]):
        self.source: ReplicaSource | None = None
        self._on_error = on_error

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        gpu, in_flight, slots, healthy, ejected = families = self._families()
        if self.source is None:
            return families
        try:
            replicas = list(self.source())
        except Exception:  # a broken callback must not break the rest of the scrape
            log.exception("replica metrics source failed")
            self._on_error()
            return families
        for r in replicas:
            labels = (r.replica, r.tier)
            gpu.add_metric((*labels, "busy"), r.busy_gpu_s)
            gpu.add_metric((*labels, "foreign"), r.foreign_gpu_s)
            gpu.add_metric((*labels, "idle"), r.idle_gpu_s)
            in_flight.add_metric(labels, r.in_flight)
            healthy.add_metric(labels, 1.0 if r.healthy else 0.0)
            ejected.add_metric(labels, 1.0 if r.ejected else 0.0)
            if r.slots > 0:
                slots.add_metric(labels, r.slots)
        return families

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        labels = ("replica", "tier")
        return (
            CounterMetricFamily(
                "tollway_replica_gpu_seconds",
                "Replica GPU-seconds: busy (this gateway), foreign (other gateways), idle.",
                labels=(*labels, "state"),
            ),
            GaugeMetricFamily("tollway_replica_in_flight", "Requests in flight.", labels=labels),
            GaugeMetricFamily("tollway_replica_slots", "vLLM max_num_seqs.", labels=labels),
            GaugeMetricFamily("tollway_replica_healthy", "1 if healthy, else 0.", labels=labels),
            GaugeMetricFamily(
                "tollway_replica_ejected",
                "1 while ejected (passive outlier detection).",
                labels=labels,
            ),
        )


# The fields a report's series is found by (``observe_requests``).
_LABELS = ("tier", "model", "tenant", "status", "cache")


class _Series:
    """Every cell one (tier, model, tenant, status, cache) request touches, found in one lookup."""

    __slots__ = (
        "cached",
        "completion",
        "duration",
        "gpu",
        "labels",
        "loaded",
        "marginal",
        "prompt",
        "requests",
        "saved",
        "ttft",
        "upstream",
    )

    def __init__(self, m: GatewayMetrics, labels: tuple[str, str, str, str, str]):
        tier, model, tenant, _, cache = self.labels = labels
        self.requests = m._requests.cell(*labels)
        self.prompt = m._tokens.cell(tier, model, tenant, cache, "prompt")
        self.completion = m._tokens.cell(tier, model, tenant, cache, "completion")
        self.cached = m._cached_tokens.cell(tier, model, tenant, cache)
        self.gpu = m._gpu.cell(tier, model, tenant)
        self.marginal = m._marginal.cell(tier, model, tenant)
        self.loaded = m._loaded.cell(tier, model, tenant)
        self.saved: list[int] | None = None  # made by the first saving: no zero series
        self.upstream = m._upstream.cell(tier)
        self.duration = m._duration.cell(tier, model, cache)
        self.ttft = m._ttft.cell(tier, model, cache)


class GatewayMetrics:
    """The gateway's metrics and their registry; one per app, built by the app's lifespan."""

    def __init__(self, *, max_tenants: int = 1000, max_models: int = 100):
        self.registry = CollectorRegistry()
        self._tenant = Capped(max_tenants)
        self._model = Capped(max_models)
        self._series: dict[tuple[str, str, str, int, str], _Series] = {}
        vecs = Families()

        def count(name: str, labels: tuple[str, ...], doc: str) -> Vec[int]:
            vecs.vecs.append(vec := Vec("counter", name, doc, labels, 0))
            return vec

        def micros(name: str, labels: tuple[str, ...], doc: str) -> Vec[int]:  # micro-seconds
            vecs.vecs.append(vec := Vec("counter", name, doc, labels, 0, MICROS))
            return vec

        def usd(name: str, labels: tuple[str, ...], doc: str) -> Vec[int]:  # in nano-dollars
            vecs.vecs.append(vec := Vec("counter", name, doc, labels, 0, NANOS_PER_USD))
            return vec

        def hist(name: str, labels: tuple[str, ...], b: Sequence[float], doc: str) -> HistVec:
            vecs.vecs.append(vec := HistVec(name, doc, labels, b))
            return vec

        req, tok, lat = (
            ("tier", "model", "tenant"),
            ("tier", "model", "tenant", "cache"),
            ("tier", "model", "cache"),
        )
        self._requests = count(
            "tollway_requests_total",
            (*req, "status", "cache"),
            "Finished client requests, cache hits, replays and errors included.",
        )
        self._tokens = count(
            "tollway_tokens_total",
            (*tok, "kind"),
            "Tokens in responses' usage (prompt|completion).",
        )
        self._cached_tokens = count(
            "tollway_cached_prompt_tokens_total", tok, "Prompt tokens from vLLM's prefix cache."
        )
        self._gpu = micros("tollway_gpu_seconds_total", req, "GPU-seconds attributed to requests.")
        self._marginal = usd(
            "tollway_cost_marginal_usd_total", req, "Marginal cost: GPU-seconds or tokens, priced."
        )
        self._loaded = usd(
            "tollway_cost_loaded_usd_total", req, "Fully loaded cost: (marginal + idle) x overhead."
        )
        self._saved = usd(
            "tollway_cost_saved_usd_total", tok, "What cache hits and replays would have cost."
        )
        self._duration = hist(
            "tollway_request_duration_seconds", lat, DURATION, "Arrival to last byte."
        )
        self._ttft = hist(
            "tollway_time_to_first_token_seconds", lat, TTFT, "Arrival to first content byte."
        )
        self._upstream = count(
            "tollway_upstream_requests_total", ("tier",), "Requests with an upstream attempt."
        )
        self._attempts = count(
            "tollway_upstream_attempts_total",
            ("tier", "replica", "outcome"),
            "Upstream attempts, retries included.",
        )
        self._burn = Vec(
            "gauge",
            "tollway_burn_rate_usd_per_hour",
            "Loaded spend per hour over the routing window (budget-aware routing).",
            ("scope",),
            0.0,
        )
        vecs.vecs.append(self._burn)
        self._queue_depth = Vec(
            "gauge", "tollway_queue_depth", "Requests awaiting admission.", ("tier",), 0
        )
        vecs.vecs.append(self._queue_depth)
        self._queue_wait = hist(
            "tollway_queue_wait_seconds", ("tier",), QUEUE_WAIT, "Queueing to dispatch."
        )
        self._shed = count(
            "tollway_shed_total", ("tier", "reason"), "Requests refused by admission (429/503)."
        )
        self._fallbacks = count(
            "tollway_fallbacks_total",
            ("from_tier", "to_tier", "reason"),
            "Requests served by a fallback tier.",
        )
        self._ejections = count(
            "tollway_replica_ejections_total",
            ("replica", "tier"),
            "Passive outlier ejections of a replica.",
        )
        self._cache = count(
            "tollway_cache_requests_total", ("tier", "result"), "Response-cache lookups."
        )
        self._redis = count(
            "tollway_redis_failures_total", ("operation",), "Redis failures (failed open)."
        )
        self._ledger_lost = count(
            "tollway_ledger_writes_lost_total", (), "Usage-ledger rows dropped."
        )
        self._telemetry = count(
            "tollway_telemetry_failures_total", ("kind",), "Telemetry failures (failed open)."
        )
        self._routes = count(
            "tollway_route_decisions_total", ("tier", "band"), "Routed requests by score band."
        )
        self._ledger_lost.cell()  # a label-free counter exists from the start, at 0
        self._replicas = _ReplicaCollector(lambda: self.telemetry_failure("replica_source"))
        self.registry.register(vecs)
        self.registry.register(self._replicas)

    def observe_requests(self, reports: Sequence[RequestReport]) -> None:
        """Count a batch of finished requests: sums per label set, not additions per request.

        The batch is split by its labels and read column by column, a chunk at
        a time (``metering.batch``), each group's figures summed per column:
        the work per request runs in C, the Python per label set
        (bench/RESULTS.md, 2026-11-23).
        """
        for chunk in chunks(reports):
            self._observe_chunk(chunk)

    def _observe_chunk(self, reports: Sequence[RequestReport]) -> None:
        for key, cols in grouped(reports, *_LABELS):
            s = self._series.get(key)
            if s is None:
                s = self._new_series(key)
            prompt, completion, cached, gpu, marginal, loaded, saved = cols.figures()
            s.requests[0] += len(cols)
            s.prompt[0] += sum(prompt)
            s.completion[0] += sum(completion)
            s.cached[0] += sum(cached)
            s.gpu[0] += sum(gpu)
            s.marginal[0] += sum(marginal)
            s.loaded[0] += sum(loaded)
            if key[4] in FREE:  # the cache status: a saving, even of nothing
                if s.saved is None:
                    tier, model, tenant, _, cache = s.labels
                    s.saved = self._saved.cell(tier, model, tenant, cache)
                s.saved[0] += sum(saved)
            s.upstream[0] += len(cols) - cols["attempts"].count(0)  # reached a replica
            s.duration.observe_many(cols["duration_s"])
            ttfts = cols["ttft_s"]
            if ttfts.count(None) < len(ttfts):
                s.ttft.observe_many([t for t in ttfts if t is not None])

    def _new_series(self, key: tuple[str, str, str, int, str]) -> _Series:
        tier, model, tenant, status, cache = key
        labels = (
            tier or NONE,
            self._model(model),
            self._tenant(tenant),
            str(status),
            cache or NONE,
        )
        series = _Series(self, labels)
        capped = (labels[1] == OTHER != model) or (labels[2] == OTHER != tenant)
        if not capped:  # forgotten otherwise, so the dict stays as bounded as the labels
            self._series[key] = series
        return series

    def observe_attempt(self, tier: str, replica: str, outcome: str) -> None:
        self._attempts.cell(tier, replica, outcome)[0] += 1

    def register_replica_source(self, source: ReplicaSource) -> None:
        """``source()`` is called at every scrape, on its thread; it replaces any earlier source."""
        self._replicas.source = source

    def observe_burn(self, scope: str, usd_per_hour: float) -> None:
        """Spend rate, loaded USD per hour: ``scope`` is "gateway" or a tenant (capped)."""
        label = scope if scope == "gateway" else self._tenant(scope)
        self._burn.cell(label)[0] = usd_per_hour

    def observe_queue(self, tier: str, depth: int) -> None:
        self._queue_depth.cell(tier)[0] = depth

    def observe_queue_wait(self, tier: str, seconds: float) -> None:
        self._queue_wait.cell(tier).observe(seconds)

    def shed(self, tier: str, reason: str) -> None:
        self._shed.cell(tier, reason)[0] += 1

    def fallback(self, from_tier: str, to_tier: str, reason: str) -> None:
        self._fallbacks.cell(from_tier, to_tier, reason)[0] += 1

    def ejection(self, replica: str, tier: str) -> None:
        self._ejections.cell(replica, tier)[0] += 1

    def observe_route(self, tier: str, score: float | None) -> None:
        """One routed-alias decision: the tier and the score's band (0.1 wide)."""
        self._routes.cell(tier, score_band(score))[0] += 1

    def cache_event(self, tier: str, result: str) -> None:
        self._cache.cell(tier, result)[0] += 1

    def redis_failure(self, operation: str) -> None:
        self._redis.cell(operation)[0] += 1

    def ledger_write_lost(self, n: int = 1) -> None:
        self._ledger_lost.cell()[0] += n

    def telemetry_failure(self, kind: str) -> None:
        self._telemetry.cell(kind)[0] += 1

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
