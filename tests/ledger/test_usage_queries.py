"""The usage queries on a real PostgreSQL: exact sums for every grouping, filters, ranges
across a month boundary, keyset paging, the CSV, and the indexes the plans use.

Known rows (three tenants, two keys each, two tiers, three models, errors, cache hits,
six hours from 21:00 on 31 January to 03:00 on 1 February, ties on ``finished_at``)
go in through ``ledger.store``, exactly as the batch writer puts them; every
expectation is computed here from the same rows in Python.
"""

from __future__ import annotations

import csv
import io
import itertools
import random
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from cache.spend import SpendCounters, Sums, window_keys
from ledger import counters, schema, store
from ledger.rows import LedgerRow
from ledger.usage import (
    GROUPS,
    Filters,
    GroupBy,
    UsageRow,
    hour_range,
    iso,
    total,
    usage,
    usage_query,
)
from ledger.usage_csv import cell, requests_csv, requests_header, usage_csv
from ledger.usage_requests import (
    REQUEST_FIELDS,
    Cursor,
    RequestQuery,
    page,
    page_query,
    public,
    rest,
    status_range,
)
from metering.money import fmt_nanos
from tests.support.postgres_server import PG_BIN, PostgresServer, installed, run_postgres
from tests.support.tools import needs

pytestmark = needs(installed(), f"PostgreSQL 15 in {PG_BIN} (Debian postgresql, bootstrap.sh)")

T0 = datetime(2026, 1, 31, 21, tzinfo=UTC)  # three hours before the month ends
FEB = datetime(2026, 2, 1, tzinfo=UTC)
MICRO = timedelta(microseconds=1)
TENANTS = ("acme", "globex", "initech")


def us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // MICRO


def row(finished_us: int, request_id: str, tenant: str = "acme", **fields: object) -> LedgerRow:
    base: dict[str, object] = {
        "key_id": f"{tenant}-k1", "tier": "small", "model": "sim-small", "replica": "r1",
        "endpoint": "chat", "status": 200, "error_type": None, "cache": "miss",
        "prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 0, "gpu_us": 1000,
        "cost_nanos": 1234, "cost_loaded_nanos": 2345, "saved_nanos": 0, "attempts": 1,
        "route_score": None, "fallback_from": None, "duration_us": 50_000, "ttft_us": None,
    }  # fmt: skip
    base.update(fields)
    return LedgerRow(finished_us, request_id, tenant, **base)  # type: ignore[arg-type]


def known_rows(count: int = 600, seed: int = 20) -> list[LedgerRow]:
    rng = random.Random(seed)
    rows: list[LedgerRow] = []
    for i in range(count):
        tenant = rng.choice(TENANTS)
        tier = rng.choice(("small", "large"))
        cache = rng.choice(("miss", "miss", "hit", "bypass"))
        status = rng.choice((200,) * 8 + (429, 502))
        finished = us(T0) + rng.randrange(6 * 3600 * 1_000_000)
        if i % 50 == 49:
            finished = rows[-1].finished_us  # a tie: request_id breaks it
        cost = rng.randrange(0, 5_000_000_000)
        rows.append(
            row(
                finished,
                f"req-{i:05d}",
                tenant,
                key_id=f"{tenant}-k{rng.randint(1, 2)}",
                tier=tier,
                model="sim-small" if tier == "small" else rng.choice(("sim-large", "sim-xl")),
                status=status,
                error_type=None if status == 200 else f"upstream_{status}",
                cache=cache,
                prompt_tokens=rng.randrange(1, 4000),
                completion_tokens=rng.randrange(0, 800),
                cached_tokens=rng.randrange(0, 100),
                gpu_us=rng.randrange(0, 3_000_000),
                cost_nanos=cost,
                cost_loaded_nanos=cost * 3 + rng.randrange(7),
                saved_nanos=rng.randrange(1, 10**6) if cache == "hit" else 0,
                route_score=rng.choice((None, 0.25, 0.73)),
                fallback_from=rng.choice((None, None, "large")),
                duration_us=rng.randrange(1000, 9_000_000),
                ttft_us=rng.choice((None, rng.randrange(1000, 900_000))),
            )
        )
    # Either side of midnight, to the micro-second: they fall in different months.
    rows.append(row(us(FEB) - 1, "req-last-of-january", "globex"))
    rows.append(row(us(FEB), "req-first-of-february", "globex"))
    return rows


ROWS = known_rows()


async def put(conn: Any, rows: list[LedgerRow]) -> None:  # a connection, or a pool's
    for month in store.months(rows):
        await store.ensure_partition(conn, month)
    await store.insert(conn, rows)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with run_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
async def pool(server: PostgresServer) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(server.url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await schema.migrate(conn)
        await put(conn, ROWS)
    yield pool
    await pool.close()


# -- grouped sums -------------------------------------------------------------------


def group_key(group_by: GroupBy, r: LedgerRow) -> str:
    at = r.finished_at
    return {
        "tenant": r.tenant,
        "key": r.key_id,
        "tier": r.tier,
        "model": r.model,
        "cache": r.cache,
        "day": at.strftime("%Y-%m-%d"),
        "hour": at.strftime("%Y-%m-%dT%H:00:00Z"),
    }[group_by]


def expected(
    group_by: GroupBy, rows: list[LedgerRow], keep: Callable[[LedgerRow], bool] = lambda r: True
) -> list[UsageRow]:
    sums: dict[str, list[int]] = {}
    for r in rows:
        if not keep(r):
            continue
        figures = (
            1, int(r.status >= 400), r.prompt_tokens, r.completion_tokens, r.cached_tokens,
            r.gpu_us, r.cost_nanos, r.cost_loaded_nanos, r.saved_nanos,
        )  # fmt: skip
        acc = sums.setdefault(group_key(group_by, r), [0] * len(figures))
        for i, value in enumerate(figures):
            acc[i] += value
    return [UsageRow(key, *sums[key]) for key in sorted(sums)]


@pytest.mark.parametrize("group_by", GROUPS)
async def test_every_grouping_sums_exactly_across_the_month_boundary(
    pool: asyncpg.Pool, group_by: GroupBy
) -> None:
    found = await usage(pool, group_by, T0, T0 + timedelta(hours=6))
    assert (found.start, found.end) == (T0, T0 + timedelta(hours=6))
    assert found.rows == expected(group_by, ROWS)
    assert found.total == total(expected("tenant", ROWS))
    assert found.total.requests == len(ROWS)
    # The API's dollars are exactly the sum of the dollars each response's header printed.
    headers = sum(Decimal(fmt_nanos(r.cost_nanos)) for r in ROWS)
    assert Decimal(found.total.public()["cost_usd"]) == headers
    assert sum(Decimal(g.public()["cost_loaded_usd"]) for g in found.rows) == Decimal(
        found.total.public()["cost_loaded_usd"]
    )


async def test_day_and_hour_keys_are_iso_dates_and_hours(pool: asyncpg.Pool) -> None:
    days = await usage(pool, "day", T0, T0 + timedelta(hours=6))
    assert [g.key for g in days.rows] == ["2026-01-31", "2026-02-01"]
    hours = await usage(pool, "hour", T0, T0 + timedelta(hours=6))
    assert [g.key for g in hours.rows] == [iso(T0 + timedelta(hours=h)) for h in range(6)]
    assert hours.rows[2].key == "2026-01-31T23:00:00Z"


@pytest.mark.parametrize(
    "filters",
    [Filters(tenant="acme"), Filters(key="globex-k2"), Filters(tier="large"),
     Filters(model="sim-xl"), Filters(tenant="acme", tier="large", model="sim-large"),
     Filters(tenant="acme", key="globex-k1"), Filters(tenant="nobody")],
)  # fmt: skip
async def test_filters(pool: asyncpg.Pool, filters: Filters) -> None:
    def keep(r: LedgerRow) -> bool:
        wanted = (filters.tenant, filters.key, filters.tier, filters.model)
        have = (r.tenant, r.key_id, r.tier, r.model)
        return all(w is None or w == h for w, h in zip(wanted, have, strict=True))

    for group_by in ("key", "hour"):
        found = await usage(pool, group_by, T0, T0 + timedelta(days=1), filters)
        assert found.rows == expected(group_by, ROWS, keep)
        assert found.filters == filters


async def test_a_range_counts_the_whole_hours_it_overlaps(pool: asyncpg.Pool) -> None:
    start, end = T0 + timedelta(hours=1, minutes=30), FEB + timedelta(minutes=10, seconds=1)
    assert hour_range(start, end) == (T0 + timedelta(hours=1), FEB + timedelta(hours=1))
    assert hour_range(FEB, FEB + timedelta(hours=1)) == (FEB, FEB + timedelta(hours=1))
    found = await usage(pool, "hour", start, end)
    assert (found.start, found.end) == (T0 + timedelta(hours=1), FEB + timedelta(hours=1))
    lo, hi = us(found.start), us(found.end)
    assert found.rows == expected("hour", ROWS, lambda r: lo <= r.finished_us < hi)
    assert [g.key for g in found.rows] == [
        "2026-01-31T22:00:00Z", "2026-01-31T23:00:00Z", "2026-02-01T00:00:00Z"
    ]  # fmt: skip

    # January only, to the micro-second: the first of February is not in it.
    january = await usage(pool, "tenant", T0, FEB, Filters(tenant="globex"))
    assert january.total == total(
        expected("tenant", ROWS, lambda r: r.tenant == "globex" and r.finished_us < us(FEB))
    )
    nothing = await usage(pool, "tenant", T0 - timedelta(days=30), T0)
    assert nothing.rows == []
    assert nothing.total == UsageRow("total")


# -- per-request rows -------------------------------------------------------------


def newest_first(rows: list[LedgerRow]) -> list[LedgerRow]:
    return sorted(rows, key=lambda r: (r.finished_us, r.request_id), reverse=True)


async def walk(pool: asyncpg.Pool, query: RequestQuery, limit: int) -> list[LedgerRow]:
    seen: list[LedgerRow] = []
    after = None
    while True:
        found = await page(pool, query, limit, after)
        assert len(found.rows) <= limit
        seen += found.rows
        if found.next is None:
            return seen
        assert len(found.rows) == limit
        after = Cursor.decode(found.next.encode())  # through its opaque spelling


async def test_paging_shows_every_row_once_newest_first(pool: asyncpg.Pool) -> None:
    assert any(a.finished_us == b.finished_us for a, b in itertools.pairwise(ROWS))
    seen = await walk(pool, RequestQuery(until=T0 + timedelta(days=1)), 37)
    assert seen == newest_first(ROWS)  # the rows back, field for field
    assert len({r.request_id for r in seen}) == len(ROWS)
    one = await page(pool, RequestQuery(until=T0 + timedelta(days=1)), len(ROWS))
    assert one.next is None
    assert len(one.rows) == len(ROWS)


@pytest.mark.parametrize(
    ("query", "keep"),
    [
        (RequestQuery(Filters(tenant="initech")), lambda r: r.tenant == "initech"),
        (RequestQuery(Filters(key="acme-k2", tier="large")),
         lambda r: r.key_id == "acme-k2" and r.tier == "large"),
        (RequestQuery(Filters(model="sim-xl"), status=(500, 600)),
         lambda r: r.model == "sim-xl" and r.status >= 500),
        (RequestQuery(since=T0 + timedelta(hours=2), until=FEB),
         lambda r: us(T0) + 2 * 3600 * 10**6 <= r.finished_us < us(FEB)),
        (RequestQuery(Filters(tenant="globex"), since=FEB, status=(200, 201)),
         lambda r: r.tenant == "globex" and r.finished_us >= us(FEB) and r.status == 200),
    ],
)  # fmt: skip
async def test_request_filters(
    pool: asyncpg.Pool, query: RequestQuery, keep: Callable[[LedgerRow], bool]
) -> None:
    want = newest_first([r for r in ROWS if keep(r)])
    assert want
    assert await walk(pool, query, 50) == want


async def test_paging_is_stable_while_newer_rows_arrive(pool: asyncpg.Pool) -> None:
    tenant = "paging-co"
    start = us(T0 + timedelta(days=2))  # outside the known rows' day
    older = [row(start + i * 1000, f"pg-{i:04d}", tenant) for i in range(95)]
    async with pool.acquire() as conn:
        await put(conn, older)
    query = RequestQuery(Filters(tenant=tenant))
    seen: list[LedgerRow] = []
    after = None
    newer = 0
    while True:
        found = await page(pool, query, 10, after)
        seen += found.rows
        # Between pages, other gateways keep landing rows that finished later.
        batch = [row(start + 10**9 + newer + i, f"new-{newer + i:04d}", tenant) for i in range(7)]
        newer += len(batch)
        async with pool.acquire() as conn:
            await put(conn, batch)
        if found.next is None:
            break
        after = found.next
    assert seen == newest_first(older)


async def test_rest_streams_the_pages_after_a_cursor_up_to_a_limit(pool: asyncpg.Pool) -> None:
    query = RequestQuery(Filters(tenant="acme"))
    want = newest_first([r for r in ROWS if r.tenant == "acme"])
    first = await page(pool, query, 5)
    assert first.rows == want[:5]
    pages = [rows async for rows in rest(pool, query, first.next, None, page_rows=13)]
    assert all(len(p) <= 13 for p in pages)
    assert [r for p in pages for r in p] == want[5:]
    limited = [rows async for rows in rest(pool, query, first.next, 20, page_rows=13)]
    assert [len(p) for p in limited] == [13, 7]
    assert [r for p in limited for r in p] == want[5:25]
    assert [rows async for rows in rest(pool, query, None, None)] == []


def test_cursors_and_status_filters_parse_strictly() -> None:
    cursor = Cursor(us(FEB), "req:with:colons/and+signs")
    assert Cursor.decode(cursor.encode()) == cursor
    assert cursor.finished_at == FEB
    assert Cursor.decode(Cursor(253402300799999999, "r").encode()).finished_us > us(FEB)
    odd = (Cursor(1, "").encode(), Cursor(1, "a\x00").encode(), Cursor(253402300800000000, "r"))
    for bad in ("", "x", "!!!!", "MTIz", "YWJjOmRlZg", "wrI6eA", *odd[:2], odd[2].encode()):
        with pytest.raises(ValueError, match="not a cursor"):
            Cursor.decode(bad)
    assert status_range("4xx") == (400, 500)
    assert status_range("5XX") == (500, 600)
    assert status_range("429") == (429, 430)
    for bad in ("6xx", "99", "x", "4x", "600", "2xxx"):
        with pytest.raises(ValueError, match="status"):
            status_range(bad)


def test_a_request_row_is_shown_with_dollars_and_milliseconds() -> None:
    shown = public(
        row(us(FEB) + 1, "r1", cost_nanos=1, cost_loaded_nanos=1_500_000_000, gpu_us=10,
            route_score=0.73, duration_us=1_234_567, ttft_us=89_000)
    )  # fmt: skip
    assert tuple(shown) == REQUEST_FIELDS
    assert shown["finished_at"] == "2026-02-01T00:00:00.000001Z"
    assert (shown["cost_usd"], shown["cost_loaded_usd"]) == ("0.000000001", "1.500000000")
    assert (shown["gpu_seconds"], shown["duration_ms"], shown["ttft_ms"]) == (1e-05, 1234.567, 89)
    assert shown["route_score"] == 0.73


async def test_route_scores_read_back_as_stored(pool: asyncpg.Pool) -> None:
    rows = (await page(pool, RequestQuery(Filters(tenant="acme")), 1000)).rows
    assert {r.route_score for r in rows} == {None, 0.25, 0.73}


# -- CSV ------------------------------------------------------------------------------


async def test_csv_reads_back_as_the_same_numbers(pool: asyncpg.Pool) -> None:
    found = await usage(pool, "key", T0, T0 + timedelta(hours=6))
    text = usage_csv(found)
    assert text.startswith("key,requests,errors,prompt_tokens,")
    assert "\r\n" in text
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(found.rows)
    for line, group in zip(parsed, found.rows, strict=True):
        shown = group.public()
        assert line["key"] == group.key
        assert int(line["requests"]) == group.requests
        assert int(line["errors"]) == group.errors
        assert Decimal(line["cost_usd"]) == Decimal(shown["cost_usd"])
        assert Decimal(line["gpu_seconds"]) * 1_000_000 == group.gpu_us
    assert sum(Decimal(line["cost_usd"]) for line in parsed) == Decimal(
        found.total.public()["cost_usd"]
    )

    rows = (await page(pool, RequestQuery(Filters(tenant="acme")), 1000)).rows
    text = requests_header() + requests_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert tuple(parsed[0]) == REQUEST_FIELDS
    for line, r in zip(parsed, rows, strict=True):
        assert line == {name: cell(value) for name, value in public(r).items()}
        assert Decimal(line["cost_loaded_usd"]) * 10**9 == r.cost_loaded_nanos
        assert line["ttft_ms"] == ("" if r.ttft_us is None else cell(r.ttft_us / 1000))
    acme = sum(r.prompt_tokens for r in ROWS if r.tenant == "acme")
    assert sum(int(line["prompt_tokens"]) for line in parsed) == acme


def test_csv_cells() -> None:
    assert [cell(v) for v in (None, 3, 1e-05, 0.5, 1234.567, "a,b", 12.0)] == [
        "", "3", "0.00001", "0.5", "1234.567", "a,b", "12.0"
    ]  # fmt: skip


# -- the plans ---------------------------------------------------------------------


async def plan(conn: Any, sql: str, *args: object) -> str:
    lines = await conn.fetch(f"EXPLAIN {sql}", *args)
    return "\n".join(line[0] for line in lines)


async def test_the_common_queries_can_use_the_usage_indexes(pool: asyncpg.Pool) -> None:
    """With scans and sorts priced out, each common query reads through an index and pages
    in index order (on tables this small the planner would rightly scan; what matters is
    that the indexes apply: a query that stopped matching them would show a Seq Scan)."""
    async with pool.acquire() as conn, conn.transaction():
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            await conn.execute(f"SET LOCAL {setting} = off")
        args: list[object] = [T0, FEB]
        sql = usage_query("day", Filters(tenant="acme"), args)
        assert "Index Scan using usage_hourly_tenant_hour" in await plan(conn, sql, *args)
        args = [T0, FEB]
        text = await plan(conn, usage_query("tenant", Filters(key="acme-k1"), args), *args)
        assert "Index Scan using usage_hourly_pkey" in text
        after = Cursor(us(FEB) + 10, "req-1")
        for filters in (Filters(tenant="acme"), Filters(key="acme-k1"), Filters()):
            for query, cursor in (
                (RequestQuery(filters), None),
                (RequestQuery(filters, since=T0, until=FEB + timedelta(hours=1)), after),
            ):
                args = []
                text = await plan(conn, page_query(query, 101, cursor, args), *args)
                assert "Seq Scan" not in text, text
                assert "Index Scan Backward using usage_requests_y2026m02_" in text, text
                assert "Presorted Key: usage_requests.finished_at" in text, text


async def test_the_spend_counters_rebuild_from_the_ledger_per_tenant_and_per_key(
    pool: asyncpg.Pool,
) -> None:
    """Each tenant's and each key's day and month, summed from ``usage_hourly``: what Redis's
    spend counters are raised to after Redis lost them (``ledger.counters``)."""
    now = FEB + timedelta(hours=3)  # the day and the month are 1 February's
    async with pool.acquire() as conn:
        spend = await counters.ledger_spend(conn, now)
    expected: dict[str, Sums] = {}
    for r in ROWS:
        if r.finished_us < us(FEB):
            continue  # January's: neither this day nor this month
        for key_id in ("", r.key_id):
            for window in window_keys(SpendCounters.PREFIX, r.tenant, now, key_id):
                sums = Sums(1, r.cost_nanos, r.cost_loaded_nanos)
                expected[window] = expected.get(window, Sums()) + sums
    assert spend == expected
    assert any(":key:" in window for window in spend)  # the keys' own windows are there
