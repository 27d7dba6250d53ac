"""The usage ledger's write side: the Redis key schema and how a batch becomes writes.

Owns the keys and ``build_writes``, which turns a batch of (report, time)
pairs into one ``_TagWrite`` per hash tag, each applied by one call of the
``APPLY`` Lua script. The queue and the writer task that call these live in
``cache.ledger``.

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
from collections.abc import Callable, Sequence

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
# h key field n | s key member | e key ttl | x key maxlen width name1..nameW "v1\tv2\t..."
# where key is an index into KEYS. A batch's stream entries travel as one
# tab-terminated string of values, an entry every ``width`` of them, paired
# here with the ``width`` field names sent once: one argument per batch instead
# of thirty-two per request, and no field names repeated per request, was most
# of the writer's CPU.
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
    local width, fields, n = tonumber(ARGV[i + 3]), {}, 0
    for j = 1, width do fields[2 * j - 1] = ARGV[i + 3 + j] end
    for value in string.gmatch(ARGV[i + 4 + width], '([^\t]*)\t') do
      n = n + 1
      fields[2 * n] = value
      if n == width then
        redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 2], '*', unpack(fields))
        n = 0
      end
    end
    i = i + 5 + width
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

# A request's stream entry: these fields, in this order (the values are written
# by ``build_writes``, the names once per batch).
STREAM_FIELDS = (
    "at",
    "request_id",
    "tenant",
    "tier",
    "model",
    "operation",
    "cache",
    "status",
    "replica",
    *METRICS[1:],  # the request's own figures, as the hashes sum them
)


def _micros(text: str) -> int:
    """The integer microseconds a six-decimal ``f"{seconds:.6f}"`` spells, exactly."""
    return int(text.replace(".", ""))


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

    def xadd_many(self, key: str, maxlen: int, values: str) -> None:
        """One stream entry per ``len(STREAM_FIELDS)`` tab-terminated ``values``."""
        if values:
            width = len(STREAM_FIELDS)
            self.ops += ["x", self.key(key, None), maxlen, width, *STREAM_FIELDS, values]

    def args(self, writer: str, seq: int) -> list[str | int]:
        expiries: list[str | int] = []
        for index, ttl in self.ttls.items():
            expiries += ["e", index, ttl]
        return [writer, seq, MARKER_TTL_S, *self.ops, *expiries]


def build_writes(
    batch: Sequence[tuple[RequestReport, float]],
    *,
    prefix: str,
    ttl: int,
    stream_maxlen: int,
    on_bad: Callable[[RequestReport], None],
) -> list[_TagWrite]:
    """The batch as integer sums per hash tag: one HINCRBY per distinct field.

    Requests are first summed per (hour, tenant, tier, model, cache), so the
    work per request is one tuple key, eight additions and its stream values
    as one f-string; names are cleaned once per group. A report whose figures
    cannot be written (a NaN) goes to ``on_bad`` and is left out.
    """
    by_tag: dict[str, _TagWrite] = {}

    def tag_write(tag: str) -> _TagWrite:
        write = by_tag.get(tag)
        if write is None:
            write = by_tag[tag] = _TagWrite(tag)
        return write

    groups: dict[tuple[int, str, str, str, str], list[int]] = {}
    lines: list[str] = []
    for report, at in batch:
        tokens, cost = report.usage, report.cost
        try:
            # The header prints six decimals; sum exactly what it printed.
            gpu_us = _micros(report.gpu_seconds_text)
            key = (int(at // 3600), report.tenant, report.tier, report.model, report.cache)
            prompt, completion = tokens.prompt_tokens, tokens.completion_tokens
            cached, saved = tokens.cached_prompt_tokens, report.saved_nanos
            marginal, loaded = cost.marginal_nanos, cost.loaded_nanos
        except (ArithmeticError, ValueError, TypeError, AttributeError):
            on_bad(report)
            continue
        sums = groups.get(key)
        if sums is None:
            sums = groups[key] = [0] * len(METRICS)
        # METRICS order, unrolled: this loop runs once per request.
        sums[0] += 1
        sums[1] += prompt
        sums[2] += completion
        sums[3] += cached
        sums[4] += gpu_us
        sums[5] += marginal
        sums[6] += loaded
        sums[7] += saved or 0
        # STREAM_FIELDS order.
        lines.append(
            f"{at:.6f}\t{report.request_id.replace(SEP, ' ')}\t{clean(report.tenant)}\t"
            f"{clean(report.tier)}\t{clean(report.model)}\t{report.operation}\t"
            f"{clean(report.cache)}\t{report.status}\t{clean(report.replica or '')}\t"
            f"{prompt}\t{completion}\t{cached}\t{gpu_us}\t{marginal}\t{loaded}\t"
            f"{'' if saved is None else saved}\t"
        )
    stream = tag_write(stream_key(prefix))
    stream.xadd_many(stream_key(prefix), stream_maxlen, "".join(lines))
    usage: dict[tuple[str, str], dict[str, int]] = {}
    spend: dict[tuple[str, str], list[int]] = {}
    for (hour_index, raw_tenant, tier, model, cache), sums in groups.items():
        hour = hour_of(hour_index * 3600)
        tenant = clean(raw_tenant)
        fields = usage.setdefault((hour, tenant), {})
        dims = SEP.join((clean(tier), clean(model), clean(cache)))
        for field, amount in zip(_metric_fields(dims), sums, strict=True):
            fields[field] = fields.get(field, 0) + amount
        for window in (f"day:{hour[:8]}", f"month:{hour[:6]}"):
            counts = spend.setdefault((tenant, window), [0, 0, 0])
            counts[0] += sums[0]  # requests
            counts[1] += sums[5]  # cost_nanos
            counts[2] += sums[6]  # cost_loaded_nanos
    for (hour, tenant), fields in usage.items():
        write = tag_write(hour_tag(prefix, hour))
        write.sadd(f"{hour_tag(prefix, hour)}:tenants", ttl, tenant)
        hash_key = tenant_hash(prefix, hour, tenant)
        for field, amount in fields.items():
            write.hincrby(hash_key, ttl, field, amount)
    for (tenant, window), counts in spend.items():
        tag = spend_tag(prefix, tenant)
        write = tag_write(tag)
        for metric, amount in zip(SPEND_METRICS, counts, strict=True):
            write.hincrby(f"{tag}:{window}", ttl, metric, amount)
    return list(by_tag.values())
