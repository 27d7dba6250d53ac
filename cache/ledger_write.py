"""The usage ledger's write side: the Redis key schema and how a batch becomes writes.

Owns the keys, the per-request ``_Entry`` (a report's figures as integers),
and ``build_writes``, which turns a batch of entries into one ``_TagWrite``
per hash tag, each applied by one call of the ``APPLY`` Lua script. The
queue and the writer task that call these live in ``cache.ledger``.

Key schema (``P`` is the prefix, default ``tollway``; times are UTC)::

    {P:usage:YYYYMMDDHH}:tenant:<tenant>   hash, one per hour and tenant:
        "<tier>\\t<model>\\t<cache>\\t<metric>" -> integer sum, metric one of
        requests, prompt_tokens, completion_tokens, cached_tokens, gpu_us,
        cost_nanos, cost_loaded_nanos, saved_nanos
    {P:usage:YYYYMMDDHH}:tenants           set: the tenants seen that hour
    {P:spend:<tenant>}:day:YYYYMMDD        hash: requests, cost_nanos, cost_loaded_nanos
    {P:spend:<tenant>}:month:YYYYMM        the same for the calendar month (budgets)
    {P:requests}                           stream: one entry per request, all its
                                           fields, trimmed to ~stream_maxlen entries
    <any tag above>:applied                hash: writer id -> last batch applied

Aggregates expire ``retention_days`` after their last write. The hash tags
keep the keys one write touches together in one cluster slot: an hour's
hashes, a tenant's spend, the stream. A batch is written as one Lua call per
tag, each guarded by that tag's ``applied`` marker (writer id, batch number),
so retrying a batch whose reply was lost (a timeout after Redis applied it)
cannot count it twice.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, fields
from decimal import Decimal

from metering.money import to_nanos
from metering.report import RequestReport

METRICS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "gpu_us",
    "cost_nanos",
    "cost_loaded_nanos",
    "saved_nanos",
)
SPEND_METRICS = ("requests", "cost_nanos", "cost_loaded_nanos")
SEP = "\t"
MARKER_TTL_S = 86_400

# Applies one batch's writes for one hash tag, unless this writer's batch
# number ARGV[2] was already applied there. Ops follow ARGV[3] (the marker TTL):
# h key field n | s key member | e key ttl | x key maxlen "field\tvalue\t..."
# where key is an index into KEYS. A stream entry travels as one tab-terminated
# string: one argument instead of thirty-two is most of the writer's CPU.
APPLY = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if last >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local i, n = 4, #ARGV
while i <= n do
  local op, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if op == 'h' then
    redis.call('HINCRBY', key, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 's' then
    redis.call('SADD', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'e' then
    redis.call('EXPIRE', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'x' then
    local fields = {}
    for item in string.gmatch(ARGV[i + 3], '([^\t]*)\t') do fields[#fields + 1] = item end
    redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 2], '*', unpack(fields))
    i = i + 4
  else
    return redis.error_reply('tollway ledger: unknown op ' .. tostring(op))
  end
end
return 1
"""


# -- keys ------------------------------------------------------------------


def hour_tag(prefix: str, hour: str) -> str:
    return f"{{{prefix}:usage:{hour}}}"


def tenant_hash(prefix: str, hour: str, tenant: str) -> str:
    return f"{hour_tag(prefix, hour)}:tenant:{tenant}"


def spend_tag(prefix: str, tenant: str) -> str:
    return f"{{{prefix}:spend:{tenant}}}"


def stream_key(prefix: str) -> str:
    return f"{{{prefix}:requests}}"


def hour_of(at: float) -> str:
    """The ``YYYYMMDDHH`` (UTC) bucket of Unix time ``at``."""
    return time.strftime("%Y%m%d%H", time.gmtime(at))


@functools.lru_cache(maxsize=4096)  # tenants, tiers, models: few, and seen per request
def clean(name: str) -> str:
    """Names go into keys and tab-separated fields: keep braces and tabs out of them."""
    return name.replace("\t", " ").replace("{", "(").replace("}", ")")


# -- one request -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """One request's figures, as integers, taken from its report when it is recorded."""

    at: float
    request_id: str
    tenant: str
    tier: str
    model: str
    operation: str
    cache: str
    status: int
    replica: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    gpu_us: int
    cost_nanos: int
    cost_loaded_nanos: int
    saved_nanos: int | None

    @classmethod
    def of(cls, report: RequestReport, at: float) -> _Entry:
        usage = report.usage
        return cls(
            at,
            report.request_id,
            clean(report.tenant),
            clean(report.tier),
            clean(report.model),
            report.operation,
            clean(report.cache),
            report.status,
            report.replica or "",
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens,
            # The header prints six decimals; sum exactly what it printed.
            _micros(report.gpu_seconds),
            to_nanos(report.cost.marginal),
            to_nanos(report.cost.loaded),
            None if report.saved is None else to_nanos(report.saved),
        )

    def metrics(self) -> tuple[int, ...]:
        return (
            1,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.gpu_us,
            self.cost_nanos,
            self.cost_loaded_nanos,
            self.saved_nanos or 0,
        )

    def stream_line(self) -> str:
        """Every field as ``name\tvalue\t``, for the Lua call to split into an XADD."""
        values = [getattr(self, name) for name in _ENTRY_FIELDS]
        values[0] = f"{self.at:.6f}"
        return "".join(
            f"{name}\t{'' if value is None else str(value).replace(SEP, ' ')}\t"
            for name, value in zip(_ENTRY_FIELDS, values, strict=True)
        )


_ENTRY_FIELDS = tuple(item.name for item in fields(_Entry))


def _micros(seconds: float) -> int:
    """``seconds`` as the integer the header's ``f"{seconds:.6f}"`` spells, exactly."""
    if seconds >= 0:
        return int(f"{seconds:.6f}".replace(".", ""))
    return int(Decimal(f"{seconds:.6f}").scaleb(6))


@functools.lru_cache(maxsize=4096)
def _metric_fields(dims: str) -> tuple[str, ...]:
    return tuple(f"{dims}{SEP}{metric}" for metric in METRICS)


# -- one batch ---------------------------------------------------------------


class _TagWrite:
    """The writes of one batch that share a hash tag: the keys and ops of one Lua call."""

    def __init__(self, tag: str) -> None:
        self.keys = [tag + ":applied"]
        self._index: dict[str, int] = {}
        self.ttls: dict[int, int] = {}
        self.ops: list[str | int] = []

    def key(self, key: str, ttl: int | None) -> int:
        """The key's 1-based index in KEYS, adding it (and its TTL) on first use."""
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)
            if ttl is not None:
                self.ttls[index] = ttl
        return index

    def hincrby(self, key: str, ttl: int, field: str, amount: int) -> None:
        if amount:
            self.ops += ["h", self.key(key, ttl), field, amount]

    def sadd(self, key: str, ttl: int, member: str) -> None:
        self.ops += ["s", self.key(key, ttl), member]

    def xadd(self, key: str, maxlen: int, line: str) -> None:
        self.ops += ["x", self.key(key, None), maxlen, line]

    def args(self, writer: str, seq: int) -> list[str | int]:
        expiries: list[str | int] = []
        for index, ttl in self.ttls.items():
            expiries += ["e", index, ttl]
        return [writer, seq, MARKER_TTL_S, *self.ops, *expiries]


def build_writes(
    batch: list[_Entry], *, prefix: str, ttl: int, stream_maxlen: int
) -> list[_TagWrite]:
    """The batch as integer sums per hash tag: one HINCRBY per distinct field."""
    by_tag: dict[str, _TagWrite] = {}

    def tag_write(tag: str) -> _TagWrite:
        write = by_tag.get(tag)
        if write is None:
            write = by_tag[tag] = _TagWrite(tag)
        return write

    usage: dict[tuple[str, str], dict[str, int]] = {}
    spend: dict[tuple[str, str], list[int]] = {}
    stream = tag_write(stream_key(prefix))
    for entry in batch:
        hour = hour_of(entry.at)
        sums = usage.setdefault((hour, entry.tenant), {})
        dims = SEP.join((entry.tier, entry.model, entry.cache))
        for field, amount in zip(_metric_fields(dims), entry.metrics(), strict=True):
            sums[field] = sums.get(field, 0) + amount
        for window in (f"day:{hour[:8]}", f"month:{hour[:6]}"):
            counts = spend.setdefault((entry.tenant, window), [0, 0, 0])
            counts[0] += 1
            counts[1] += entry.cost_nanos
            counts[2] += entry.cost_loaded_nanos
        stream.xadd(stream_key(prefix), stream_maxlen, entry.stream_line())
    for (hour, tenant), sums in usage.items():
        write = tag_write(hour_tag(prefix, hour))
        write.sadd(f"{hour_tag(prefix, hour)}:tenants", ttl, tenant)
        key = tenant_hash(prefix, hour, tenant)
        for field, amount in sums.items():
            write.hincrby(key, ttl, field, amount)
    for (tenant, window), counts in spend.items():
        tag = spend_tag(prefix, tenant)
        write = tag_write(tag)
        for metric, amount in zip(SPEND_METRICS, counts, strict=True):
            write.hincrby(f"{tag}:{window}", ttl, metric, amount)
    return list(by_tag.values())
