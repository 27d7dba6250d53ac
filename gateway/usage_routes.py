"""The usage API, read from the ledger in PostgreSQL: ``GET /v1/usage`` and ``/v1/usage/requests``.

``/v1/usage`` sums usage over whole UTC hours, grouped (``ledger.usage``);
``/v1/usage/requests`` lists the requests themselves, newest first, a page at
a time (``ledger.usage_requests``). Both answer JSON, or CSV with
``format=csv`` (``ledger.usage_csv``; a request export streams every row
unless ``limit`` is given). Every gateway gives the same answer: it is all SQL.

An admin key sees every tenant (or one, with ``tenant=``); any other key sees
its own tenant only (403 for another) and may narrow it to one of its keys.
A database that is not configured, down or slower than its statement timeout
answers 503.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from fastapi import APIRouter, Query, Request
from starlette.responses import Response, StreamingResponse

from gateway.auth import Principal
from gateway.errors import InvalidRequest, PermissionDenied, ServiceUnavailable
from gateway.routes import _ERRORS, _json, _services
from gateway.services import Services
from ledger.database import UNREACHABLE
from ledger.rows import LedgerRow
from ledger.usage import GROUPS, Filters, iso, usage
from ledger.usage_csv import MEDIA_TYPE, requests_csv, requests_header, usage_csv
from ledger.usage_requests import Cursor, RequestQuery, page, public, rest, status_range

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger("tollway.usage")

router = APIRouter()

MAX_PAGE = 1000  # rows per JSON page
DEFAULT_PAGE = 100
EXPORT_PAGE = 5000  # rows per query while a CSV export streams
FORMATS = ("json", "csv")

# What a database that is down, or slower than its statement timeout, raises.
DOWN: tuple[type[BaseException], ...] = (*UNREACHABLE, asyncpg.QueryCanceledError)

_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _ERRORS[400],
    401: _ERRORS[401],
    403: {"description": "another tenant's usage (only admin keys see every tenant)"},
    503: {"description": "no database configured, or it is down or too slow"},
}

T = TypeVar("T", bound=str)


def _choice(value: str, choices: tuple[T, ...], param: str) -> T:
    found = next((choice for choice in choices if choice == value), None)
    if found is None:
        raise InvalidRequest(f"'{param}' must be one of {', '.join(choices)}.", param=param)
    return found


def _when(value: str | None, param: str) -> datetime | None:
    """An ISO 8601 date or time (``Z`` or an offset; none: UTC)."""
    if value is None:
        return None
    # An unescaped "+01:00" in a query string arrives as " 01:00".
    candidates = (value, value[:-6] + "+" + value[-5:]) if value[-6:-5] == " " else (value,)
    for text in candidates:
        try:
            parsed = datetime.fromisoformat(text)
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError):  # OverflowError: past year 1 or 9999 in UTC
            continue
    raise InvalidRequest(
        f"'{param}' must be an ISO 8601 date or time, e.g. 2026-11-01 or 2026-11-01T13:00Z.",
        param=param,
    )


def _range(since: datetime | None, until: datetime | None, param: str) -> None:
    if since is not None and until is not None and until <= since:
        raise InvalidRequest(f"'{param}' must be after the range's start.", param=param)


def _filters(
    principal: Principal, tenant: str | None, key: str | None, tier: str | None, model: str | None
) -> Filters:
    """The filters asked for, in the tenant the key may read: any (or all) for an admin
    key, else its own."""
    for param, value in (("tenant", tenant), ("key", key), ("tier", tier), ("model", model)):
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold it
            raise InvalidRequest(f"'{param}' must not contain a NUL character.", param=param)
    if not principal.admin:
        if tenant not in (None, principal.tenant):
            raise PermissionDenied("This API key may only read its own tenant's usage.")
        tenant = principal.tenant
    return Filters(tenant, key, tier, model)


def _limit(value: str | None, csv: bool) -> int | None:
    """Rows to return: JSON pages hold 1..1000 (default 100); a CSV export, all or ``limit``."""
    if value is None:
        return None if csv else DEFAULT_PAGE
    top = None if csv else MAX_PAGE
    digits = value.isascii() and value.isdigit() and len(value) <= 9
    if not digits or int(value) < 1 or (top is not None and int(value) > top):
        most = "a positive integer" if top is None else f"between 1 and {top}"
        raise InvalidRequest(f"'limit' must be {most}.", param="limit")
    return int(value)


@asynccontextmanager
async def _database(services: Services) -> AsyncIterator[PoolConnectionProxy]:
    """A connection to the ledger; any way the database fails is a 503."""
    pool, config = services.database, services.settings.database
    if pool is None or config is None:
        raise ServiceUnavailable(
            "The usage API reads the ledger in PostgreSQL, and this gateway has no database "
            "configured (the `database:` section of its config)."
        )
    try:
        async with pool.acquire(timeout=config.statement_timeout_s) as conn:
            yield conn
    except DOWN as exc:
        log.warning("usage query failed, the database is down or slow: %r", exc)
        raise ServiceUnavailable(
            "The usage ledger (PostgreSQL) is not reachable right now, or did not answer in time."
        ) from None


def _attachment(body: str, name: str) -> Response:
    disposition = f'attachment; filename="{name}.csv"'
    return Response(body, media_type=MEDIA_TYPE, headers={"content-disposition": disposition})


@router.get("/v1/usage", responses=_RESPONSES)
async def usage_sums(
    request: Request,
    group_by: str = "tenant",
    start: str | None = None,
    end: str | None = None,
    tenant: str | None = None,
    key: str | None = None,
    tier: str | None = None,
    model: str | None = None,
    output: str = Query("json", alias="format"),
) -> Response:
    """Sums of metered usage over the whole UTC hours that overlap ``[start, end)``, grouped.

    Defaults: from the start of the current UTC day to now. ``start`` and ``end``
    in the answer are the hours actually summed.
    """
    services = _services(request)
    principal = services.auth.authenticate(request.headers.get("authorization"))
    group = _choice(group_by, GROUPS, "group_by")
    csv = _choice(output, FORMATS, "format") == "csv"
    now = datetime.now(UTC)
    since = _when(start, "start") or now.replace(hour=0, minute=0, second=0, microsecond=0)
    until = _when(end, "end") or now
    _range(since, until, "end")
    filters = _filters(principal, tenant, key, tier, model)
    async with _database(services) as db:
        found = await usage(db, group, since, until, filters)
    if csv:
        return _attachment(usage_csv(found), f"tollway-usage-by-{group}")
    return _json(
        {
            "object": "usage",
            "group_by": group,
            "start": iso(found.start),
            "end": iso(found.end),
            "tenant": filters.tenant,
            "filters": filters.public(),
            "data": [row.public() for row in found.rows],
            "total": found.total.public(),
        }
    )


@router.get("/v1/usage/requests", responses=_RESPONSES)
async def usage_requests(
    request: Request,
    tenant: str | None = None,
    key: str | None = None,
    tier: str | None = None,
    model: str | None = None,
    status: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: str | None = None,
    cursor: str | None = None,
    output: str = Query("json", alias="format"),
) -> Response:
    """Metered requests, newest first: a page of ``limit`` rows and the ``next`` cursor.

    ``since`` is inclusive and ``until`` exclusive; ``status`` is a code (``429``)
    or a class (``5xx``). With ``format=csv`` every row after ``cursor`` streams
    (or the first ``limit``).
    """
    services = _services(request)
    principal = services.auth.authenticate(request.headers.get("authorization"))
    csv = _choice(output, FORMATS, "format") == "csv"
    rows = _limit(limit, csv)
    query = RequestQuery(
        _filters(principal, tenant, key, tier, model),
        since=_when(since, "since"),
        until=_when(until, "until"),
        status=_status(status),
    )
    _range(query.since, query.until, "until")
    after = _cursor(cursor)
    async with _database(services) as db:
        first = await page(
            db, query, EXPORT_PAGE if rows is None else min(rows, EXPORT_PAGE), after
        )
    if csv:
        left = None if rows is None else rows - len(first.rows)
        return StreamingResponse(
            _export(services, query, first.rows, first.next, left),
            media_type=MEDIA_TYPE,
            headers={"content-disposition": 'attachment; filename="tollway-usage-requests.csv"'},
        )
    return _json(
        {
            "object": "list",
            "data": [public(row) for row in first.rows],
            "has_more": first.next is not None,
            "next": None if first.next is None else first.next.encode(),
            "limit": rows,
            "since": None if query.since is None else iso(query.since),
            "until": None if query.until is None else iso(query.until),
            "status": status,
            "filters": query.filters.public(),
        }
    )


def _status(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return status_range(value)
    except ValueError:
        raise InvalidRequest(
            "'status' must be an HTTP status (429) or a class (2xx, 4xx, 5xx).", param="status"
        ) from None


def _cursor(value: str | None) -> Cursor | None:
    if value is None:
        return None
    try:
        return Cursor.decode(value)
    except ValueError:
        raise InvalidRequest(
            "'cursor' is not a cursor this API returned (use a page's 'next').", param="cursor"
        ) from None


async def _export(
    services: Services,
    query: RequestQuery,
    first: list[LedgerRow],
    after: Cursor | None,
    left: int | None,
) -> AsyncIterator[str]:
    """The CSV body: the first page (read before the answer started), then the rest."""
    yield requests_header() + requests_csv(first)
    if services.database is None:
        return
    try:
        async for rows in rest(services.database, query, after, left, EXPORT_PAGE):
            yield requests_csv(rows)
    except DOWN as exc:
        # Too late for a 503: the export ends without its last chunk, so the
        # client sees a broken transfer, never a short file that looks whole.
        log.warning("CSV export cut short, the database is down or slow: %r", exc)
        raise
