"""The gateway's Prometheus metrics: what ``/metrics`` exposes, and the calls that feed it.

``GatewayMetrics`` owns its own ``CollectorRegistry`` (never the process-wide
default), so several gateways, or tests, can live in one process. The
gateway hands ``observe_requests`` its finished requests' ``RequestReport``s a
batch at a time (the recorder's), calls ``observe_attempt`` once per upstream
try, and the other methods from the scheduler, cache and ledger; ``render()``
is the body of ``GET /metrics``. Dashboards, alert rules and the autoscaler
query the names below, so they are an interface: rename nothing without
migrating those.

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
  budget_unchecked_total              counter    tenant
  ledger_spool_rows                   gauge      (none)
  ledger_rows_written_total           counter    (none)
  ledger_rows_dropped_total           counter    reason
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
  already keeps the running totals, so requests push nothing and the values
  are as fresh as the scrape. When one vLLM process serves several
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
- ``ledger_spool_rows``: ledger rows not yet in PostgreSQL (queued, or in the
  spool on disk); it grows while the database is down and falls when it is
  back. ``ledger_rows_written_total``: rows PostgreSQL acknowledged.
  ``ledger_rows_dropped_total``: rows lost, ``reason`` spool_full (the spool
  reached ``ledger.spool_max_bytes``) | rejected (set aside in the spool's
  ``rejected.jsonl``: the database refused the row's data). Alert on any.
- ``redis_failures_total`` and ``telemetry_failures_total``: the fail-open
  paths, counted. ``budget_unchecked_total``: requests of a budgeted tenant
  served without a reservation because Redis was down (``fail_open``).

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

How the values are kept: prometheus_client's ``Counter``, ``Gauge`` and
``Histogram``, except for the counters of figures the headers print in fixed
point, GPU-seconds (six decimals) and dollars (nine): those are summed as
integer micro-GPU-seconds and nano-dollars and divided once, at scrape time,
so a counter equals the sum of the headers it counted (a float counter would
drift from it by a rounding per request). prometheus_client would add a
``_created`` sample to every counter and histogram; this registry's collector
drops them, leaving every other registry in the process as it is.
Everything, ``render()`` included, runs on the event loop's thread (serve
``/metrics`` from an ``async def`` route): the replica source advances the
occupancy ledgers, which the loop also writes.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from metering.money import NANOS_PER_USD
from metering.occupancy import OccupancySnapshot
from metering.pricing import MICROS_PER_SECOND
from metering.report import RequestReport

log = logging.getLogger(__name__)

OTHER = "other"  # a tenant or model past its cap
NONE = "none"  # an empty label value: a request refused before auth or routing
INF = float("inf")

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


_Stock = TypeVar("_Stock", Counter, Gauge, Histogram)


class _WithoutCreated:
    """prometheus_client metric objects, collected without their ``_created`` samples.

    ``prometheus_client.disable_created_metrics()`` would drop them for every
    registry in the process; here only this registry's are.
    """

    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric: _Stock) -> _Stock:
        self._metrics.append(metric)
        return metric

    def describe(self) -> Iterable[Metric]:
        return [family for metric in self._metrics for family in metric.describe()]

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                created = family.name + "_created"
                family.samples = [s for s in family.samples if s.name != created]
                yield family


class _FixedPointCounter:
    """A counter summed as an integer of 1/``per_unit`` units, exported divided by ``per_unit``.

    For the figures headers print in fixed point (micro-GPU-seconds,
    nano-dollars): the integer sum is exact and the one division, int by int,
    is correctly rounded, so the exported value is the float nearest the sum
    of the headers, however many requests were added.
    """

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], per_unit: int):
        self._name, self._doc, self._labels, self._per_unit = name, doc, labels, per_unit
        self._units: dict[tuple[str, ...], int] = {}

    def add(self, labels: tuple[str, ...], units: int) -> None:
        self._units[labels] = self._units.get(labels, 0) + units

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._doc, labels=self._labels)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, units in list(self._units.items()):
            family.add_metric(labels, units / self._per_unit)
        return [family]


class _Capped:
    """Label values admitted first-come up to ``limit``; later ones become ``other``."""

    def __init__(self, limit: int):
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if not value:
            return NONE
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


@dataclass(frozen=True, slots=True)
class _Series:
    """What one (tier, model, tenant, status, cache) label set of requests updates."""

    requests: Counter
    prompt: Counter
    completion: Counter
    cached: Counter
    upstream: Counter
    duration: Histogram
    ttft: Histogram
    spend: tuple[str, str, str]  # (tier, model, tenant): GPU-seconds and dollars
    saved: tuple[str, str, str, str]  # (tier, model, tenant, cache)


class GatewayMetrics:
    """The gateway's metrics and their registry; one per app, built by the app's lifespan."""

    def __init__(self, *, max_tenants: int = 1000, max_models: int = 100):
        self.registry = CollectorRegistry()
        self._tenant = _Capped(max_tenants)
        self._model = _Capped(max_models)
        self._series: dict[tuple[str, str, str, str, str], _Series] = {}
        stock = _WithoutCreated()

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return stock.add(Counter(name, doc, labels, registry=None))

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return stock.add(Gauge(name, doc, labels, registry=None))

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            return stock.add(Histogram(name, doc, labels, registry=None, buckets=buckets))

        req, tok, lat = (
            ("tier", "model", "tenant"),
            ("tier", "model", "tenant", "cache"),
            ("tier", "model", "cache"),
        )
        self._requests = counter(
            "tollway_requests_total",
            "Finished client requests, cache hits, replays and errors included.",
            (*req, "status", "cache"),
        )
        self._tokens = counter(
            "tollway_tokens_total",
            "Tokens in responses' usage (prompt|completion).",
            (*tok, "kind"),
        )
        self._cached_tokens = counter(
            "tollway_cached_prompt_tokens_total", "Prompt tokens from vLLM's prefix cache.", tok
        )
        self._gpu = _FixedPointCounter(
            "tollway_gpu_seconds_total",
            "GPU-seconds attributed to requests.",
            req,
            MICROS_PER_SECOND,
        )
        self._marginal = _FixedPointCounter(
            "tollway_cost_marginal_usd_total",
            "Marginal cost: GPU-seconds or tokens, priced.",
            req,
            NANOS_PER_USD,
        )
        self._loaded = _FixedPointCounter(
            "tollway_cost_loaded_usd_total",
            "Fully loaded cost: (marginal + idle) x overhead.",
            req,
            NANOS_PER_USD,
        )
        self._saved = _FixedPointCounter(
            "tollway_cost_saved_usd_total",
            "What cache hits and replays would have cost.",
            tok,
            NANOS_PER_USD,
        )
        self._duration = histogram(
            "tollway_request_duration_seconds", "Arrival to last byte.", lat, DURATION
        )
        self._ttft = histogram(
            "tollway_time_to_first_token_seconds", "Arrival to first content byte.", lat, TTFT
        )
        self._upstream = counter(
            "tollway_upstream_requests_total", "Requests with an upstream attempt.", ("tier",)
        )
        self._attempts = counter(
            "tollway_upstream_attempts_total",
            "Upstream attempts, retries included.",
            ("tier", "replica", "outcome"),
        )
        self._burn = gauge(
            "tollway_burn_rate_usd_per_hour",
            "Loaded spend per hour over the routing window (budget-aware routing).",
            ("scope",),
        )
        self._queue_depth = gauge("tollway_queue_depth", "Requests awaiting admission.", ("tier",))
        self._queue_wait = histogram(
            "tollway_queue_wait_seconds", "Queueing to dispatch.", ("tier",), QUEUE_WAIT
        )
        self._shed = counter(
            "tollway_shed_total", "Requests refused by admission (429/503).", ("tier", "reason")
        )
        self._fallbacks = counter(
            "tollway_fallbacks_total",
            "Requests served by a fallback tier.",
            ("from_tier", "to_tier", "reason"),
        )
        self._ejections = counter(
            "tollway_replica_ejections_total",
            "Passive outlier ejections of a replica.",
            ("replica", "tier"),
        )
        self._cache = counter(
            "tollway_cache_requests_total", "Response-cache lookups.", ("tier", "result")
        )
        self._redis = counter(
            "tollway_redis_failures_total", "Redis failures (failed open).", ("operation",)
        )
        self._spool_rows = gauge(
            "tollway_ledger_spool_rows",
            "Ledger rows not yet in PostgreSQL (queued or spooled).",
            (),
        )
        self._rows_written = counter(
            "tollway_ledger_rows_written_total", "Ledger rows PostgreSQL acknowledged.", ()
        )
        self._rows_dropped = counter(
            "tollway_ledger_rows_dropped_total", "Ledger rows lost.", ("reason",)
        )
        self._unchecked = counter(
            "tollway_budget_unchecked_total",
            "Budgeted requests served unchecked (Redis down, fail_open).",
            ("tenant",),
        )
        self._telemetry = counter(
            "tollway_telemetry_failures_total", "Telemetry failures (failed open).", ("kind",)
        )
        self._routes = counter(
            "tollway_route_decisions_total", "Routed requests by score band.", ("tier", "band")
        )
        self._replicas = _ReplicaCollector(lambda: self.telemetry_failure("replica_source"))
        for collector in (stock, self._gpu, self._marginal, self._loaded, self._saved):
            self.registry.register(collector)
        self.registry.register(self._replicas)  # last: its failures show in the next scrape

    def observe_requests(self, reports: Iterable[RequestReport]) -> None:
        """Count a batch of finished requests (the recorder's), one report at a time."""
        for r in reports:
            usage, cost = r.usage, r.cost
            if min(*usage, r.gpu_us, *cost, r.saved_nanos) < 0:
                # A counter that went down would read as a reset to rate(): a bug upstream.
                log.error("request %s has a negative figure: not counted", r.request_id)
                self.telemetry_failure("negative_figure")
                continue
            s = self._series_of(r)
            s.requests.inc()
            s.prompt.inc(usage.prompt_tokens)
            s.completion.inc(usage.completion_tokens)
            s.cached.inc(usage.cached_prompt_tokens)
            self._gpu.add(s.spend, r.gpu_us)
            self._marginal.add(s.spend, cost.marginal_nanos)
            self._loaded.add(s.spend, cost.loaded_nanos)
            if r.free:  # a saving, even of nothing: the series exists for free answers only
                self._saved.add(s.saved, r.saved_nanos)
            if r.attempts > 0:  # reached a replica
                s.upstream.inc()
            s.duration.observe(r.duration_s)
            if r.ttft_s is not None:
                s.ttft.observe(r.ttft_s)

    def _series_of(self, r: RequestReport) -> _Series:
        tier, cache = r.tier or NONE, r.cache or NONE
        model, tenant = self._model(r.model), self._tenant(r.tenant)
        key = (tier, model, tenant, str(r.status), cache)
        series = self._series.get(key)  # as bounded as the label values
        if series is None:
            series = self._series[key] = _Series(
                requests=self._requests.labels(*key),
                prompt=self._tokens.labels(tier, model, tenant, cache, "prompt"),
                completion=self._tokens.labels(tier, model, tenant, cache, "completion"),
                cached=self._cached_tokens.labels(tier, model, tenant, cache),
                upstream=self._upstream.labels(tier),
                duration=self._duration.labels(tier, model, cache),
                ttft=self._ttft.labels(tier, model, cache),
                spend=(tier, model, tenant),
                saved=(tier, model, tenant, cache),
            )
        return series

    def observe_attempt(self, tier: str, replica: str, outcome: str) -> None:
        self._attempts.labels(tier, replica, outcome).inc()

    def register_replica_source(self, source: ReplicaSource) -> None:
        """``source()`` is called at every scrape, on its thread; it replaces any earlier source."""
        self._replicas.source = source

    def observe_burn(self, scope: str, usd_per_hour: float) -> None:
        """Spend rate, loaded USD per hour: ``scope`` is "gateway" or a tenant (capped)."""
        label = scope if scope == "gateway" else self._tenant(scope)
        self._burn.labels(label).set(usd_per_hour)

    def observe_queue(self, tier: str, depth: int) -> None:
        self._queue_depth.labels(tier).set(depth)

    def observe_queue_wait(self, tier: str, seconds: float) -> None:
        self._queue_wait.labels(tier).observe(seconds)

    def shed(self, tier: str, reason: str) -> None:
        self._shed.labels(tier, reason).inc()

    def fallback(self, from_tier: str, to_tier: str, reason: str) -> None:
        self._fallbacks.labels(from_tier, to_tier, reason).inc()

    def ejection(self, replica: str, tier: str) -> None:
        self._ejections.labels(replica, tier).inc()

    def observe_route(self, tier: str, score: float | None) -> None:
        """One routed-alias decision: the tier and the score's band (0.1 wide)."""
        self._routes.labels(tier, score_band(score)).inc()

    def cache_event(self, tier: str, result: str) -> None:
        self._cache.labels(tier, result).inc()

    def redis_failure(self, operation: str) -> None:
        self._redis.labels(operation).inc()

    def register_spool_source(self, rows: Callable[[], int]) -> None:
        """``rows()`` (the ledger rows not yet in PostgreSQL) is read at every scrape."""
        self._spool_rows.set_function(rows)

    def ledger_rows_written(self, n: int) -> None:
        self._rows_written.inc(n)

    def ledger_rows_dropped(self, reason: str, n: int) -> None:
        self._rows_dropped.labels(reason).inc(n)

    def budget_unchecked(self, tenant: str) -> None:
        self._unchecked.labels(self._tenant(tenant)).inc()

    def telemetry_failure(self, kind: str) -> None:
        self._telemetry.labels(kind).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
