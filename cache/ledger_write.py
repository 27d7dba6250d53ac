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
from typing import NamedTuple

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
# h key field n | s key member | e key ttl | x key maxlen width "field\tvalue\t..."
# where key is an index into KEYS. A batch's stream entries travel as one
# tab-terminated string, an entry every ``width`` items: one argument per batch
# instead of thirty-two per request was most of the writer's CPU.
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
    for item in string.gmatch(ARGV[i + 4], '([^\t]*)\t') do
      n = n + 1
      fields[n] = item
      if n == width then
        redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 2], '*', unpack(fields))
        n = 0
      end
    end
    i = i + 5
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


class _Entry(NamedTuple):
    """One request's figures, as integers, taken from its report when it is recorded.

    A named tuple, not a frozen dataclass: the writer makes one per request,
    and a frozen dataclass's ``__init__`` costs a ``setattr`` per field.
    """

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
        cost = report.cost
        return cls(
            at,
            report.request_id,
            clean(report.tenant),
            clean(report.tier),
            clean(report.model),
            report.operation,
            clean(report.cache),
            report.status,
            clean(report.replica or ""),
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens,
            # The header prints six decimals; sum exactly what it printed.
            _micros(report.gpu_seconds_text),
            cost.marginal_nanos,
            cost.loaded_nanos,
            report.saved_nanos,
        )

    def stream_line(self) -> str:
        """Every field as ``name\tvalue\t`` (``STREAM_WIDTH`` items), for Lua to split."""
        (at, request_id, tenant, tier, model, operation, cache, status, replica, prompt,
         completion, cached, gpu_us, cost, loaded, saved) = self  # fmt: skip
        request_id = request_id.replace(SEP, " ")  # names were cleaned on the way in
        return (
            f"at\t{at:.6f}\trequest_id\t{request_id}\ttenant\t{tenant}\ttier\t{tier}\t"
            f"model\t{model}\toperation\t{operation}\tcache\t{cache}\tstatus\t{status}\t"
            f"replica\t{replica}\tprompt_tokens\t{prompt}\tcompletion_tokens\t{completion}\t"
            f"cached_tokens\t{cached}\tgpu_us\t{gpu_us}\tcost_nanos\t{cost}\t"
            f"cost_loaded_nanos\t{loaded}\tsaved_nanos\t{'' if saved is None else saved}\t"
        )


STREAM_WIDTH = 2 * len(_Entry._fields)  # items (names and values) per stream entry


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

    def xadd_many(self, key: str, maxlen: int, lines: str) -> None:
        """One stream entry per ``STREAM_WIDTH`` tab-terminated items of ``lines``."""
        if lines:
            self.ops += ["x", self.key(key, None), maxlen, STREAM_WIDTH, lines]

    def args(self, writer: str, seq: int) -> list[str | int]:
        expiries: list[str | int] = []
        for index, ttl in self.ttls.items():
            expiries += ["e", index, ttl]
        return [writer, seq, MARKER_TTL_S, *self.ops, *expiries]


def build_writes(
    batch: list[_Entry], *, prefix: str, ttl: int, stream_maxlen: int
) -> list[_TagWrite]:
    """The batch as integer sums per hash tag: one HINCRBY per distinct field.

    Entries are first summed per (hour, tenant, tier, model, cache), so the work
    per entry is a tuple key and eight additions; the stream's lines travel as
    one argument for the whole batch.
    """
    by_tag: dict[str, _TagWrite] = {}

    def tag_write(tag: str) -> _TagWrite:
        write = by_tag.get(tag)
        if write is None:
            write = by_tag[tag] = _TagWrite(tag)
        return write

    groups: dict[tuple[int, str, str, str, str], list[int]] = {}
    lines: list[str] = []
    for entry in batch:
        key = (int(entry.at // 3600), entry.tenant, entry.tier, entry.model, entry.cache)
        sums = groups.get(key)
        if sums is None:
            sums = groups[key] = [0] * len(METRICS)
        # METRICS order, unrolled: this loop runs once per request.
        sums[0] += 1
        sums[1] += entry.prompt_tokens
        sums[2] += entry.completion_tokens
        sums[3] += entry.cached_tokens
        sums[4] += entry.gpu_us
        sums[5] += entry.cost_nanos
        sums[6] += entry.cost_loaded_nanos
        sums[7] += entry.saved_nanos or 0
        lines.append(entry.stream_line())
    stream = tag_write(stream_key(prefix))
    stream.xadd_many(stream_key(prefix), stream_maxlen, "".join(lines))
    usage: dict[tuple[str, str], dict[str, int]] = {}
    spend: dict[tuple[str, str], list[int]] = {}
    for (hour_index, tenant, tier, model, cache), sums in groups.items():
        hour = hour_of(hour_index * 3600)
        fields = usage.setdefault((hour, tenant), {})
        for field, amount in zip(_metric_fields(SEP.join((tier, model, cache))), sums, strict=True):
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
