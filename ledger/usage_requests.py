"""Per-request ledger rows for finance's drill-down: filtered, newest first, paged by keyset.

``page(db, query, limit, after)`` reads ``usage_requests`` newest first
(``finished_at``, then ``request_id``, both descending: a total order, since a
row is unique by the pair) and hands back the rows and, when more follow, a
``Cursor`` at the last one. The next page starts strictly after it, so paging
never shows a row twice nor skips one, and rows inserted meanwhile with a
later ``finished_at`` (the newer ones) do not shift it. ``rest`` pages on from
a cursor for an export that streams (each page a short query of its own, so a
slow client holds no connection).

Rows land a second or two after their request ends (spool, then batch
writer), and from several gateways; a row that lands behind a cursor already
passed is not seen by that walk. Exports of a closed range (``until`` a few
seconds ago) are complete.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from ledger.rows import COLUMNS, EPOCH, LedgerRow
from ledger.usage import Filters, iso
from metering.money import fmt_nanos
from metering.report import MICROS

if TYPE_CHECKING:
    from ledger.usage import Db

MICROSECOND = timedelta(microseconds=1)
_LAST_US = (datetime.max.replace(tzinfo=UTC) - EPOCH) // MICROSECOND  # a datetime's last

# route_score is a real (float4): through its shortest text it reads back as 0.73,
# not as the double nearest the float4 (0.7300000190734863).
_SELECT = ", ".join(
    "route_score::text::float8 AS route_score" if c == "route_score" else c for c in COLUMNS
)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the newest-first order: the last row a page showed."""

    finished_us: int
    request_id: str

    def encode(self) -> str:
        """Opaque to clients: URL-safe base64 of ``<finished_us>:<request_id>``."""
        raw = f"{self.finished_us}:{self.request_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor ``encode`` made; ``ValueError`` for anything else."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValueError("not a cursor") from None
        micros, sep, request_id = raw.partition(":")
        digits = micros.isascii() and micros.isdigit() and len(micros) <= 18
        if not (sep and request_id and digits) or "\x00" in request_id or int(micros) > _LAST_US:
            raise ValueError("not a cursor")
        return cls(int(micros), request_id)

    @property
    def finished_at(self) -> datetime:
        return EPOCH + self.finished_us * MICROSECOND


def status_range(text: str) -> tuple[int, int]:
    """A status filter as a half-open range: ``4xx`` is [400, 500), ``429`` is [429, 430)."""
    if len(text) == 3 and text[0] in "12345" and text[1:].lower() == "xx":
        low = int(text[0]) * 100
        return low, low + 100
    if len(text) == 3 and text.isdigit() and 100 <= int(text) <= 599:
        return int(text), int(text) + 1
    raise ValueError(f"not a status or status class: {text!r}")


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """Which requests: the usage filters, a time range ``[since, until)``, a status range."""

    filters: Filters = field(default_factory=Filters)
    since: datetime | None = None
    until: datetime | None = None
    status: tuple[int, int] | None = None

    def where(self, args: list[object], after: Cursor | None) -> list[str]:
        conditions = self.filters.where(args)
        if self.status is not None:
            args += self.status
            conditions.append(f"status >= ${len(args) - 1} AND status < ${len(args)}")
        if self.since is not None:
            args.append(self.since)
            conditions.append(f"finished_at >= ${len(args)}")
        if self.until is not None:
            args.append(self.until)
            conditions.append(f"finished_at < ${len(args)}")
        if after is not None:
            # The plain bound lets the planner use the time indexes; the row
            # comparison breaks ties within one micro-second.
            args += (after.finished_at, after.request_id)
            at, rid = len(args) - 1, len(args)
            conditions.append(
                f"finished_at <= ${at} AND (finished_at, request_id) < (${at}, ${rid})"
            )
        return conditions


def page_query(query: RequestQuery, limit: int, after: Cursor | None, args: list[object]) -> str:
    conditions = query.where(args, after)
    args.append(limit)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return (
        f"SELECT {_SELECT} FROM usage_requests{where}"
        f" ORDER BY finished_at DESC, request_id DESC LIMIT ${len(args)}"
    )


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[LedgerRow]
    next: Cursor | None  # None: this page is the last


async def page(db: Db, query: RequestQuery, limit: int, after: Cursor | None = None) -> Page:
    """Up to ``limit`` (>= 1) rows after ``after``, newest first."""
    args: list[object] = []
    records = await db.fetch(page_query(query, limit + 1, after, args), *args)
    rows = [_row(record.values()) for record in records[:limit]]
    more = len(records) > limit
    return Page(rows, Cursor(rows[-1].finished_us, rows[-1].request_id) if more else None)


async def rest(
    db: Db, query: RequestQuery, after: Cursor | None, limit: int | None, page_rows: int = 5000
) -> AsyncIterator[list[LedgerRow]]:
    """The pages after ``after``, up to ``limit`` rows in all (None: to the end)."""
    left = limit
    while after is not None and (left is None or left > 0):
        found = await page(db, query, page_rows if left is None else min(page_rows, left), after)
        if left is not None:
            left -= len(found.rows)
        after = found.next
        if found.rows:
            yield found.rows


def _row(values: Any) -> LedgerRow:
    finished_at, *rest_ = values
    return LedgerRow((finished_at - EPOCH) // MICROSECOND, *rest_)


def _same(name: str) -> Callable[[LedgerRow], Any]:
    return attrgetter(name)


# One request as the usage API's JSON and CSV show it: (field, how it reads a row).
_FIELDS: tuple[tuple[str, Callable[[LedgerRow], Any]], ...] = (
    ("finished_at", lambda row: iso(row.finished_at)),
    *((name, _same(name)) for name in ("request_id", "tenant", "key_id", "tier", "model")),
    *((name, _same(name)) for name in ("replica", "endpoint", "status", "error_type", "cache")),
    ("prompt_tokens", _same("prompt_tokens")),
    ("completion_tokens", _same("completion_tokens")),
    ("cached_prompt_tokens", _same("cached_tokens")),
    ("gpu_seconds", lambda row: row.gpu_us / MICROS),
    ("cost_usd", lambda row: fmt_nanos(row.cost_nanos)),  # the headers' spelling
    ("cost_loaded_usd", lambda row: fmt_nanos(row.cost_loaded_nanos)),
    ("saved_usd", lambda row: fmt_nanos(row.saved_nanos)),
    *((name, _same(name)) for name in ("attempts", "route_score", "fallback_from")),
    ("duration_ms", lambda row: row.duration_us / 1000),
    ("ttft_ms", lambda row: None if row.ttft_us is None else row.ttft_us / 1000),
)
REQUEST_FIELDS: tuple[str, ...] = tuple(name for name, _ in _FIELDS)


def public(row: LedgerRow) -> dict[str, Any]:
    """One request as the usage API's JSON and CSV show it."""
    return {name: read(row) for name, read in _FIELDS}
