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
from itertools import groupby, repeat
from operator import attrgetter, floordiv, itemgetter
from typing import Any

from metering.report import FIGURES, RequestReport

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
# h key field n | s key member | e key ttl
# | x key maxlen width name1..nameW count cname1 cvalue1..cnameC cvalueC "v1\tv2\t..."
# where key is an index into KEYS. A group of stream entries (requests that
# share the ``count`` common fields: tenant, tier, model...) travels as one
# tab-terminated string of their own values, an entry every ``width`` of them,
# paired here with the ``width`` field names sent once, the common fields added
# to each: one argument per group instead of thirty-two per request, and nothing
# repeated per request that the group shares, was most of the writer's CPU.
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
    local c = i + 4 + width
    local common = 2 * tonumber(ARGV[c])
    for j = 1, common do fields[2 * width + j] = ARGV[c + j] end
    for value in string.gmatch(ARGV[c + common + 1], '([^\t]*)\t') do
      n = n + 1
      fields[2 * n] = value
      if n == width then
        redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 2], '*', unpack(fields))
        n = 0
      end
    end
    i = c + common + 2
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

# A request's stream entry: its own fields, then those its group shares, in this
# order (the values are written by ``build_writes``, the names once per group).
ENTRY_FIELDS = (
    "at_us",  # Unix time in whole micro-seconds
    "request_id",
    *METRICS[1:],  # the request's own figures, as the hashes sum them
)
COMMON_FIELDS = ("tenant", "tier", "model", "cache", "operation", "status", "replica")
STREAM_FIELDS = (*ENTRY_FIELDS, *COMMON_FIELDS)
# A request's own fields read off a report, and their spelling: one C-level ``%``.
_ENTRY = attrgetter(
    "finished_us", "request_id", "usage.prompt_tokens", "usage.completion_tokens",
    "usage.cached_prompt_tokens", "gpu_us", "cost.marginal_nanos", "cost.loaded_nanos",
    "saved_nanos",
)  # fmt: skip
_LINE = "%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t"
# What the hashes sum per group: ``FIGURES`` is in METRICS order after "requests".
_FIGURES = FIGURES
_AT = attrgetter("finished_us")
_US_PER_HOUR = 3_600_000_000
_GROUP = attrgetter(*COMMON_FIELDS)  # the hashes' dimensions first: tenant, tier, model, cache
_KEY = itemgetter(0)
_REPORT = itemgetter(1)


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

    def xadd_many(self, key: str, maxlen: int, values: str, common: Sequence[str]) -> None:
        """One stream entry per ``len(ENTRY_FIELDS)`` tab-terminated ``values``, each
        with the ``COMMON_FIELDS`` set to ``common``."""
        if values:
            pairs = [item for pair in zip(COMMON_FIELDS, common, strict=True) for item in pair]
            width = len(ENTRY_FIELDS)
            self.ops += [
                "x", self.key(key, None), maxlen, width, *ENTRY_FIELDS,
                len(COMMON_FIELDS), *pairs, values,
            ]  # fmt: skip

    def args(self, writer: str, seq: int) -> list[str | int]:
        expiries: list[str | int] = []
        for index, ttl in self.ttls.items():
            expiries += ["e", index, ttl]
        return [writer, seq, MARKER_TTL_S, *self.ops, *expiries]


def build_writes(
    batch: Sequence[RequestReport],
    *,
    prefix: str,
    ttl: int,
    stream_maxlen: int,
    on_bad: Callable[[RequestReport], None],
) -> list[_TagWrite]:
    """The batch as integer sums per hash tag: one HINCRBY per distinct field.

    The work per request runs in C: the reports are grouped by (hour, the
    ``COMMON_FIELDS``) with a sort, each group's figures summed by ``map``s and
    its stream entries spelled by one ``%`` each, of the request's own fields
    only. A group that does not spell cleanly that way (a tab in a request id,
    a figure that is not a number) takes ``_entries_one_by_one``, which leaves
    out and reports (``on_bad``) what cannot be written.
    """
    by_tag: dict[str, _TagWrite] = {}

    def tag_write(tag: str) -> _TagWrite:
        write = by_tag.get(tag)
        if write is None:
            write = by_tag[tag] = _TagWrite(tag)
        return write

    stream_at = stream_key(prefix)
    stream = tag_write(stream_at)
    usage: dict[tuple[str, str], dict[str, int]] = {}
    spend: dict[tuple[str, str], list[int]] = {}
    try:
        hours = list(map(floordiv, map(_AT, batch), repeat(_US_PER_HOUR)))
        keys = zip(hours, map(_GROUP, batch), strict=True)
        groups = groupby(sorted(zip(keys, batch, strict=True), key=_KEY), key=_KEY)
        grouped = [(key, list(map(_REPORT, group))) for key, group in groups]
    except (ArithmeticError, TypeError, AttributeError):  # a field of the wrong kind
        grouped = _grouped_one_by_one(batch, on_bad)
    for (hour_index, common), rows in grouped:
        values = _entries(rows)
        if values is None:
            values, rows = _entries_one_by_one(rows, on_bad)
            if not rows:
                continue
        stream.xadd_many(stream_at, stream_maxlen, values, list(map(str, common)))
        raw_tenant, tier, model, cache = common[:4]
        sums = [len(rows), *(sum(map(figure, rows)) for figure in _FIGURES)]
        hour = hour_of(int(hour_index) * 3600)
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


def _entries(rows: list[RequestReport]) -> str | None:
    """The rows' own stream values, one C-level ``%`` each; None if any does not spell cleanly."""
    try:
        values = "".join(map(_LINE.__mod__, map(_ENTRY, rows)))
    except (ValueError, TypeError, AttributeError):
        return None
    return values if values.count(SEP) == len(rows) * len(ENTRY_FIELDS) else None


_Grouped = list[tuple[tuple[int, tuple[Any, ...]], list[RequestReport]]]


def _grouped_one_by_one(
    batch: Sequence[RequestReport], on_bad: Callable[[RequestReport], None]
) -> _Grouped:
    """The batch grouped report by report: one whose date or fields cannot be read is left out."""
    groups: dict[tuple[int, tuple[Any, ...]], list[RequestReport]] = {}
    for report in batch:
        try:
            key = (report.finished_us // _US_PER_HOUR, _GROUP(report))
            hash(key)
            int(key[0])
        except (ArithmeticError, ValueError, TypeError, AttributeError):
            on_bad(report)
            continue
        groups.setdefault(key, []).append(report)
    return list(groups.items())


def _entries_one_by_one(
    rows: Sequence[RequestReport], on_bad: Callable[[RequestReport], None]
) -> tuple[str, list[RequestReport]]:
    """The stream values entry by entry: tabs in text become spaces; what fails is left out."""
    lines: list[str] = []
    kept: list[RequestReport] = []
    for report in rows:
        try:
            fields = _ENTRY(report)
            line = _LINE % tuple(f.replace(SEP, " ") if isinstance(f, str) else f for f in fields)
            sum(f(report) for f in _FIGURES)  # every figure a number
        except (ArithmeticError, ValueError, TypeError, AttributeError):
            on_bad(report)
            continue
        lines.append(line)
        kept.append(report)
    return "".join(lines), kept
