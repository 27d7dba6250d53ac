"""Configuration: the one YAML file, its pydantic models, and how it is loaded.

Every model forbids unknown fields, so a typo fails at start with the path of
the bad field instead of silently falling back to a default. Values may name
environment variables as ``${VAR}`` or ``${VAR:-default}`` (secrets, URLs), and
a few well-known variables override whole fields (see ``ENV_OVERRIDES``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)


class RedisConfig(Strict):
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False  # url names one node of a Redis Cluster
    call_budget_ms: PositiveFloat = 50.0  # past this a call is abandoned and the request goes on


class CacheConfig(Strict):
    default_ttl_s: int = Field(default=3600, ge=1)
    max_ttl_s: int = Field(default=7 * 86400, ge=1)  # caps x-tollway-cache-ttl
    max_entry_bytes: int = Field(default=1_000_000, ge=1024)  # compressed
    coalesce: bool = True  # identical in-flight requests wait for one upstream call
    coalesce_wait_s: PositiveFloat = 60.0  # then a follower goes upstream itself
    # Hot entries are also kept in the process this long (0: off), saving a Redis
    # round trip per hit; an entry may outlive its Redis expiry by this much.
    local_ttl_s: NonNegativeFloat = 1.0
    local_max_entries: int = Field(default=5000, ge=1)


class IdempotencyConfig(Strict):
    ttl_s: int = Field(default=86400, ge=1)  # how long a finished response is replayed
    lease_s: PositiveFloat = 30.0  # a dead gateway holds a key this long at most
    wait_s: PositiveFloat = 30.0  # a retry waits this long for the first, then 409


class DatabaseConfig(Strict):
    """The PostgreSQL database that holds the usage ledger and the managed API keys.

    ``url`` is a libpq URL (``postgresql://user:pass@host:5432/db``); keep the
    password out of the file: ``url: ${TOLLWAY_DATABASE_URL}``. Its schema is
    created and upgraded by ``tollway db migrate``; a gateway refuses to start
    on a schema version it does not know.
    """

    url: str = Field(pattern=r"^postgres(ql)?://", repr=False)
    pool_size: int = Field(default=4, ge=1, le=100)
    connect_timeout_s: PositiveFloat = 5.0
    statement_timeout_s: PositiveFloat = 30.0  # a usage query past this is cancelled (503)


class LedgerConfig(Strict):
    """Where each metered request's row goes: a local spool on disk, then PostgreSQL.

    Rows are appended to the spool and fsync'd every ``sync_interval_s`` (what
    a SIGKILL can lose is at most that long of rows), then written to the
    database in batches of up to ``batch_rows`` every ``write_interval_s``.
    While the database is down rows wait on disk, up to ``spool_max_bytes``;
    past it new rows are dropped, counted and logged (never blocking a request).
    The spool directory belongs to one gateway process (it is locked).
    """

    spool_dir: str = "./tollway-spool"
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    sync_interval_s: float = Field(default=0.2, gt=0, le=5)
    write_interval_s: float = Field(default=1.0, gt=0, le=60)
    batch_rows: int = Field(default=5000, ge=1, le=100_000)
    retention_months: int = Field(default=25, ge=1)  # what `tollway db prune` keeps
    # How often each gateway checks that Redis still holds the spend counters budgets
    # read; when it lost them (restarted empty), they are rebuilt from the ledger.
    counters_check_s: float = Field(default=5.0, gt=0, le=300)


RedisDown = Literal["fail_open", "fail_closed"]


class BudgetConfig(Strict):
    """A tenant's spend limits in USD (fully loaded cost), per UTC day and calendar month."""

    daily_usd: NonNegativeFloat | None = None
    monthly_usd: NonNegativeFloat | None = None
    on_redis_down: RedisDown | None = None  # None: reservations.on_redis_down

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.daily_usd is None and self.monthly_usd is None:
            raise ValueError("give daily_usd, monthly_usd or both")
        return self


class RateLimitConfig(Strict):
    """A tenant's rate limits, shared by every gateway (GCRA in Redis, gateway.budgets)."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)  # prompt + completion

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimitConfig:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("give requests_per_minute, tokens_per_minute or both")
        return self


class ReservationConfig(Strict):
    """How budgets hold a request's worst-case cost before it runs (gateway.budgets)."""

    # A reservation whose gateway died is let go after this; None: the upstream's
    # total_timeout_s plus 30 s (a live request is always settled before).
    hold_s: PositiveFloat | None = None
    # A GPU-priced tier's cost per token before it has served anything, and the least
    # it is ever taken to be (loaded USD per million tokens; see metering/estimate.py).
    unobserved_usd_per_mtok: PositiveFloat = 20.0
    floor_usd_per_mtok: NonNegativeFloat = 0.0
    # A GPU-priced tier's estimate times this: a token's GPU time swings with how many
    # share the batch, and the most seen lately may not be the most the next one takes.
    margin: Annotated[float, Field(ge=1)] = 2.0
    # Redis unreachable: serve unchecked (counted, reconciled from the ledger after)
    # or refuse with 503. Per tenant: budgets.<tenant>.on_redis_down.
    on_redis_down: RedisDown = "fail_open"


class ApiKey(Strict):
    """One API key and its tenant. Keep secrets out of the file: ``key: ${TEAM_A_KEY}``."""

    key: str = Field(min_length=8, repr=False)
    tenant: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    admin: bool = False
    # Admission priority of this key's requests (higher first); None: the tier's.
    priority: int | None = Field(default=None, ge=-100, le=100)
    force_tier: bool = False  # may pick the tier itself with x-tollway-tier
    # This key's own rate limits, beside its tenant's (``rate_limits``); None: none.
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)  # prompt + completion


class AuthConfig(Strict):
    keys: list[ApiKey] = Field(min_length=1)
    # How often each gateway polls the database for managed keys that changed
    # (created, revoked, rotated): a revocation reaches every gateway within about this.
    refresh_s: PositiveFloat = 1.0


class Replica(Strict):
    url: str = Field(pattern=r"^https?://[^/\s]+$")
    # The replica's vLLM --max-num-seqs: the gateway never has more in flight
    # there. vLLM does not publish it (not in /metrics), so it is configured.
    max_num_seqs: int = Field(default=256, ge=1)
    gpus: PositiveFloat = 1.0
    gpu_hourly_usd: NonNegativeFloat = 0.0


class TokenPrices(Strict):
    input_usd_per_mtok: NonNegativeFloat
    output_usd_per_mtok: NonNegativeFloat


class Tier(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    models: list[str] = Field(min_length=1)
    replicas: list[Replica] = Field(min_length=1)
    prices: TokenPrices | None = None
    # always: every complete answer; deterministic: temperature 0 or a seed; never
    cache: Literal["always", "deterministic", "never"] = "deterministic"
    # Tiers to try, in order, when this one has no available replica or cannot
    # admit a request within its deadline.
    fallback: list[str] = Field(default_factory=list)
    priority: int = Field(default=0, ge=-100, le=100)  # admission priority of its requests
    # The most a request that sets no max_tokens is taken to generate, for budget
    # reservations (not sent to vLLM).
    max_output_tokens: int = Field(default=4096, ge=1)


class RoutingConfig(Strict):
    aliases: list[str] = Field(default_factory=lambda: ["auto"])
    default_tier: str | None = None
    # Complexity routing of aliases: tier i (cheapest first) owns scores in
    # [cut_points[i-1], cut_points[i]). None: aliases go to default_tier.
    cut_points: list[Annotated[float, Field(ge=0, le=1)]] | None = None
    weights_file: str | None = None  # feature weights (YAML); None: the shipped default
    # Budget-aware routing: past these burn rates (loaded USD per hour, over
    # burn_window_s) cut points rise, sending more traffic to cheaper tiers.
    burn_target_usd_per_hour: PositiveFloat | None = None  # the whole gateway
    tenant_burn_targets: dict[str, PositiveFloat] = Field(default_factory=dict)
    max_shift: Annotated[float, Field(ge=0, le=1)] = 0.2
    burn_window_s: PositiveFloat = 300.0


class UpstreamConfig(Strict):
    connect_timeout_s: PositiveFloat = 2.0
    first_byte_timeout_s: PositiveFloat = 60.0
    total_timeout_s: PositiveFloat = 600.0
    max_attempts: int = Field(default=3, ge=1, le=10)
    pool_size_per_replica: int = Field(default=512, ge=1)


class HealthConfig(Strict):
    interval_s: PositiveFloat = 1.0  # /health and vLLM's /metrics, per replica
    timeout_s: PositiveFloat = 1.0
    unhealthy_after: int = Field(default=2, ge=1)
    # Passive outlier ejection: after this many failed upstream attempts in a row
    # (a refused connection counts as all of them) a replica is ejected for
    # ejection_s, doubling on each ejection without a success between, up to
    # max_ejection_s; then it is re-admitted and tried again.
    eject_after: int = Field(default=3, ge=1)
    ejection_s: PositiveFloat = 5.0
    max_ejection_s: PositiveFloat = 60.0


class SchedulingConfig(Strict):
    """Admission: each replica runs at most max_num_seqs requests; the rest wait here."""

    # How long a request may wait for a slot (x-tollway-deadline-ms overrides, up
    # to max_deadline_ms). A request predicted or found to wait longer is shed
    # with 429 + Retry-After, or sent to a fallback tier.
    deadline_ms: int = Field(default=30_000, ge=1)
    max_deadline_ms: int = Field(default=600_000, ge=1)
    max_queue: int = Field(default=1000, ge=0)  # waiting requests per tier, then 429
    tenant_weights: dict[str, PositiveFloat] = Field(default_factory=dict)  # default 1


class LimitsConfig(Strict):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # A client has this long to send its whole body once its head is in; past it the
    # answer is 408 and the connection closes. (The head's own timeout is the
    # proxy's in front: uvicorn has none, see docs/configuration.md.)
    body_read_timeout_s: PositiveFloat = 10.0


class MeteringConfig(Strict):
    # false: no token parsing, pricing, cost figures, request metrics, spans or
    # ledger rows (replica occupancy is still tracked; the cache, coalescing and
    # idempotency work as ever); budgets and burn targets need it on.
    enabled: bool = True
    overhead_factor: Annotated[float, Field(ge=1)] = 1.25
    idle_window_s: PositiveFloat = 300.0


class TelemetryConfig(Strict):
    """Spans go wherever the standard OTEL_* variables say (OTLP); off when they say nothing."""

    record_content: bool = False  # prompt and completion text on spans: opt-in only


class OpsConfig(Strict):
    """Who may read the operational endpoints: ``/metrics`` and the detailed ``/ready``.

    Both show every tenant's figures and every replica's URL and last error, so
    the public listener serves them only to a bearer ``metrics_token``
    (``Authorization: Bearer <token>``); its plain ``/ready`` says ready or not
    and nothing else. ``admin_listen`` adds a second listener, loopback by
    default, that serves ``/metrics``, the detailed ``/ready`` and ``/health``
    without a token: keep it off any network tenants reach. With neither set,
    ``/metrics`` is refused (401) unless ``metrics_public: true`` says the
    public port is itself private.
    """

    metrics_token: str | None = Field(default=None, min_length=16, repr=False)
    admin_listen: ListenConfig | None = None
    metrics_public: bool = False  # /metrics and the detailed /ready to anyone: opt-in only
    docs: bool = True  # /openapi.json, /docs and /redoc

    @model_validator(mode="after")
    def _one_way_in(self) -> OpsConfig:
        if self.metrics_public and self.metrics_token is not None:
            raise ValueError("metrics_public: true serves /metrics to anyone; drop metrics_token")
        return self


class Settings(Strict):
    listen: ListenConfig = ListenConfig()
    redis: RedisConfig = RedisConfig()
    auth: AuthConfig
    tiers: list[Tier] = Field(min_length=1)
    routing: RoutingConfig = RoutingConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    health: HealthConfig = HealthConfig()
    limits: LimitsConfig = LimitsConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    metering: MeteringConfig = MeteringConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    # None: no ledger (rows are not kept, /v1/usage answers 503) and only the
    # keys in auth.keys; a warning says so at start.
    database: DatabaseConfig | None = None
    ledger: LedgerConfig = LedgerConfig()
    cache: CacheConfig = CacheConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    budgets: dict[str, BudgetConfig] = Field(default_factory=dict)  # by tenant
    reservations: ReservationConfig = ReservationConfig()
    rate_limits: dict[str, RateLimitConfig] = Field(default_factory=dict)  # by tenant
    ops: OpsConfig = OpsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        tier_names = [t.name for t in self.tiers]
        _no_repeats("tier name", tier_names)
        served = [m for t in self.tiers for m in t.models]
        _no_repeats("model name (a model belongs to one tier)", served)
        for alias in self.routing.aliases:
            if alias in served:
                raise ValueError(f"routing alias {alias!r} is also a tier's model name")
        cuts = self.routing.cut_points
        if cuts is not None:
            if len(cuts) != len(self.tiers) - 1:
                raise ValueError(
                    f"routing.cut_points needs {len(self.tiers) - 1} value(s), one between "
                    f"each pair of tiers (cheapest first); got {len(cuts)}"
                )
            if list(cuts) != sorted(cuts):
                raise ValueError("routing.cut_points must be in ascending order")
        for tier in self.tiers:
            for other in tier.fallback:
                if other not in tier_names or other == tier.name:
                    raise ValueError(
                        f"tier {tier.name!r}: fallback {other!r} is not another tier ({tier_names})"
                    )
        default = self.routing.default_tier
        if default is not None and default not in tier_names:
            raise ValueError(f"routing.default_tier {default!r} is not a tier ({tier_names})")
        if not self.metering.enabled:  # they read what metering counts: silent otherwise
            needs = [
                name
                for name, used in (
                    ("budgets", bool(self.budgets)),
                    ("routing.burn_target_usd_per_hour", self.routing.burn_target_usd_per_hour),
                    ("routing.tenant_burn_targets", bool(self.routing.tenant_burn_targets)),
                )
                if used
            ]
            if needs:
                raise ValueError(f"{', '.join(needs)} need metering: metering.enabled is false")
        tenants = {key.tenant for key in self.auth.keys}
        for tenant in self.budgets:
            if tenant not in tenants:
                raise ValueError(f"budgets: {tenant!r} is not the tenant of any API key")
        for tenant in self.scheduling.tenant_weights:
            if tenant not in tenants:
                raise ValueError(
                    f"scheduling.tenant_weights: {tenant!r} is not the tenant of any API key"
                )
        shared: dict[str, Replica] = {}
        for tier in self.tiers:
            for replica in tier.replicas:
                if shared.setdefault(replica.url, replica) != replica:
                    raise ValueError(
                        f"replica {replica.url} appears in several tiers with different "
                        "settings; one process has one max_num_seqs, gpus and price"
                    )
        return self

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)


def _no_repeats(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {what}: {name!r}")
        seen.add(name)


class ConfigError(Exception):
    """The config file cannot be used; the message names the file and the field."""


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Env vars that replace a whole field, applied after interpolation.
ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "TOLLWAY_REDIS_URL": ("redis", "url"),
    "TOLLWAY_DATABASE_URL": ("database", "url"),
    "TOLLWAY_SPOOL_DIR": ("ledger", "spool_dir"),
    "TOLLWAY_HOST": ("listen", "host"),
    "TOLLWAY_PORT": ("listen", "port"),
    "TOLLWAY_METRICS_TOKEN": ("ops", "metrics_token"),
}


def _interpolate(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _apply_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, path in ENV_OVERRIDES.items():
        if var in env:
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = env[var]


def format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{source}: {path}: {first['msg']}"


def parse_settings(raw: Any, source: str, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    raw = _interpolate(raw, env, "")
    _apply_overrides(raw, env)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(raw, str(path), env)
