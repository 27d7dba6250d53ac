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
import struct
import time
from collections.abc import Callable, Sequence
from itertools import chain
from operator import attrgetter
from typing import Any

from metering.batch import Columns, chunks, grouped
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
# | b key maxlen n width name1..nameW count cname1 cvalue1..cnameC cvalueC "id1\t..." numbers
# | x key maxlen width name1..nameW count cname1 cvalue1..cnameC cvalueC "v1\tv2\t..."
# where key is an index into KEYS. A group of stream entries (requests that
# share the ``count`` common fields: tenant, tier, model...) travels in two
# arguments, the field names and the common fields once:
# - ``b`` (packed): the ``n`` request ids, tab-terminated, and their ``width``
#   numeric fields as little-endian 64-bit integers, field by field (``n`` of the
#   first field, then of the second...), spelled in decimal here. Lua's numbers
#   are doubles: ``build_writes`` packs only integers of magnitude below 2**53;
# - ``x`` (text): every entry's values spelled by the gateway, tab-terminated,
#   an entry every ``width`` of them (a group that does not pack).
# One argument per group instead of thirty-two per request, and no number
# spelled in Python: a batch is a few large arguments, not thousands of small ones.
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
  elseif op == 'b' then
    local n, width = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    local c = i + 5 + width
    local common = 2 * tonumber(ARGV[c])
    local numbers = ARGV[c + common + 2]
    local fields, j = {ARGV[i + 5], '', 'request_id', ''}, 0
    for k = 2, width do fields[2 * k + 1] = ARGV[i + 4 + k] end
    for k = 1, common do fields[2 * width + 2 + k] = ARGV[c + k] end
    for id in string.gmatch(ARGV[c + common + 1], '([^\t]*)\t') do
      fields[2] = string.format('%d', (struct.unpack('<i8', numbers, 8 * j + 1)))
      fields[4] = id
      for k = 2, width do
        local at = 8 * ((k - 1) * n + j) + 1
        fields[2 * k + 2] = string.format('%d', (struct.unpack('<i8', numbers, at)))
      end
      redis.call('XADD', key, 'MAXLEN', '~', ARGV[i + 2], '*', unpack(fields))
      j = j + 1
    end
    i = c + common + 3
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
# A request's own fields read off a report, and their spelling as text: one C-level
# ``%`` (the ``x`` op, for a group that does not pack).
_ENTRY = attrgetter(
    "finished_us", "request_id", "usage.prompt_tokens", "usage.completion_tokens",
    "usage.cached_prompt_tokens", "gpu_us", "cost.marginal_nanos", "cost.loaded_nanos",
    "saved_nanos",
)  # fmt: skip
_LINE = "%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t"
# The packed entries' numeric fields (the ``b`` op): ENTRY_FIELDS but the request id.
PACKED_FIELDS = (ENTRY_FIELDS[0], *ENTRY_FIELDS[2:])
_INT64 = 2**63  # Redis sums (HINCRBY) signed 64-bit integers
# A packed number's second byte from the top: 0 when under 0x20, below 2**53, which
# Lua's numbers (doubles) hold exactly.
_OVER = bytes(0 if byte < 0x20 else 1 for byte in range(256))
# A report's figures, in METRICS order after "requests" (the text path's check).
_FIGURES = FIGURES
_US_PER_HOUR = 3_600_000_000
# The hashes' dimensions first: tenant, tier, model, cache.
_GROUP = attrgetter(*COMMON_FIELDS)


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
        self.ops: list[str | int | bytes] = []

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

    def xadd_packed(
        self, key: str, maxlen: int, ids: str, numbers: bytes, common: Sequence[str]
    ) -> None:
        """One stream entry per tab-terminated request id in ``ids``, its ``PACKED_FIELDS``
        read from ``numbers`` (``_packed``), the ``COMMON_FIELDS`` set to ``common``."""
        width = len(PACKED_FIELDS)
        self.ops += [
            "b", self.key(key, None), maxlen, len(numbers) // (8 * width), width, *PACKED_FIELDS,
            len(COMMON_FIELDS), *_pairs(common), ids, numbers,
        ]  # fmt: skip

    def xadd_many(self, key: str, maxlen: int, values: str, common: Sequence[str]) -> None:
        """One stream entry per ``len(ENTRY_FIELDS)`` tab-terminated ``values``, each
        with the ``COMMON_FIELDS`` set to ``common``."""
        if values:
            width = len(ENTRY_FIELDS)
            self.ops += [
                "x", self.key(key, None), maxlen, width, *ENTRY_FIELDS,
                len(COMMON_FIELDS), *_pairs(common), values,
            ]  # fmt: skip

    def args(self, writer: str, seq: int) -> list[str | int | bytes]:
        expiries: list[str | int] = []
        for index, ttl in self.ttls.items():
            expiries += ["e", index, ttl]
        return [writer, seq, MARKER_TTL_S, *self.ops, *expiries]


def _pairs(common: Sequence[str]) -> list[str]:
    return [item for pair in zip(COMMON_FIELDS, common, strict=True) for item in pair]


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
    ``COMMON_FIELDS``), each group transposed into columns (``metering.batch``),
    its figures summed column by column and its stream entries packed: the
    request ids joined, the numbers copied into one string of 64-bit integers,
    which the Lua script spells. A group that does not pack that way (a tab in
    a request id, a figure that is not an integer, negative or 2**53 and over)
    is spelled as text, and ``_entries_one_by_one`` leaves out and reports
    (``on_bad``) what cannot be written.
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
        groups = _by_hour(batch)
    except (ArithmeticError, TypeError, AttributeError):  # a field of the wrong kind
        groups = _grouped_one_by_one(batch, on_bad)
    for hour_index, common, cols in groups:
        common_text = list(map(str, common))
        packed = _packed(cols)
        rows = cols.rows
        if packed is not None:
            ids, numbers, figures = packed
            stream.xadd_packed(stream_at, stream_maxlen, ids, numbers, common_text)
        else:
            values, rows = _entries_one_by_one(rows, on_bad)
            if not rows:
                continue
            stream.xadd_many(stream_at, stream_maxlen, values, common_text)
            figures = Columns(rows).figures()
        raw_tenant, tier, model, cache = common[:4]
        sums = [len(rows), *map(sum, figures)]
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


def _by_hour(batch: Sequence[RequestReport]) -> list[tuple[int, tuple[Any, ...], Columns]]:
    """The batch grouped by its ``COMMON_FIELDS``, then by hour (rarely more than one),
    a ``CHUNK`` of reports at a time."""
    by_hour = []
    for common, cols in (
        group for chunk in chunks(batch) for group in grouped(chunk, *COMMON_FIELDS)
    ):
        at = cols["finished_us"]
        first, last = min(at) // _US_PER_HOUR, max(at) // _US_PER_HOUR
        if first == last:
            by_hour.append((int(first), common, cols))
            continue
        hours: dict[int, list[RequestReport]] = {}
        for report in cols.rows:
            hours.setdefault(int(report.finished_us // _US_PER_HOUR), []).append(report)
        by_hour += [(hour, common, Columns(part)) for hour, part in sorted(hours.items())]
    return by_hour


def _packed(cols: Columns) -> tuple[str, bytes, list[tuple[int, ...]]] | None:
    """The stream entries of ``cols`` packed for the ``b`` op (request ids, numbers),
    and their figures; None if they do not pack (then they are spelled as text)."""
    try:
        figures = cols.figures()
        ids = SEP.join(cols["request_id"]) + SEP
        numbers = _pack(cols["finished_us"], *figures)
    except (ValueError, TypeError, AttributeError, OverflowError, struct.error):
        return None
    # Only integers in [0, 2**53) pack: as little-endian 64-bit words, their top
    # byte is 0 and the one below it under 0x20 (checked in C, a byte a number).
    top, below = numbers[7::8], numbers[6::8]
    if (
        ids.count(SEP) != len(cols)
        or top.count(0) != len(top)
        or below.translate(_OVER).count(0) != len(below)
    ):
        return None
    return ids, numbers, figures


def _pack(*cols: tuple[int, ...]) -> bytes:
    """``cols`` as little-endian 64-bit integers, column after column."""
    return struct.pack(f"<{len(cols) * len(cols[0])}q", *chain.from_iterable(cols))


def _grouped_one_by_one(
    batch: Sequence[RequestReport], on_bad: Callable[[RequestReport], None]
) -> list[tuple[int, tuple[Any, ...], Columns]]:
    """The batch grouped report by report: one whose date or fields cannot be read is left out."""
    groups: dict[tuple[int, tuple[Any, ...]], list[RequestReport]] = {}
    for report in batch:
        try:
            key = (int(report.finished_us // _US_PER_HOUR), _GROUP(report))
            hash(key)
        except (ArithmeticError, ValueError, TypeError, AttributeError):
            on_bad(report)
            continue
        groups.setdefault(key, []).append(report)
    return [(hour, common, Columns(rows)) for (hour, common), rows in groups.items()]


def _entries_one_by_one(
    rows: Sequence[RequestReport], on_bad: Callable[[RequestReport], None]
) -> tuple[str, list[RequestReport]]:
    """The stream values entry by entry: tabs in text become spaces; what fails is left out.

    Every figure and the date must be an integer Redis can sum (64 bits): a
    larger one would fail its batch's script halfway through.
    """
    lines: list[str] = []
    kept: list[RequestReport] = []
    for report in rows:
        try:
            fields = _ENTRY(report)
            line = _LINE % tuple(f.replace(SEP, " ") if isinstance(f, str) else f for f in fields)
            numbers = (report.finished_us, *(figure(report) for figure in _FIGURES))
        except (ArithmeticError, ValueError, TypeError, AttributeError):
            numbers = ()
        if not numbers or not all(isinstance(n, int) and -_INT64 <= n < _INT64 for n in numbers):
            on_bad(report)
            continue
        lines.append(line)
        kept.append(report)
    return "".join(lines), kept
