"""The usage API on SQL: ``GET /v1/usage`` and ``/v1/usage/requests``, JSON and CSV.

Known ledger rows go into a real, migrated PostgreSQL through ``ledger.store``.
Most tests drive the gateway's ASGI app in the test's loop (``Services.build``
with a pool on that database; nothing else is started: the usage API needs
only the database and the keys); the CLI tests run ``tollway usage`` against
real gateway processes, two of them, which must give the same answers.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.app import create_api
from gateway.config import parse_settings
from gateway.request_id import RequestIdMiddleware
from gateway.services import Services
from ledger import schema, store
from ledger.database import open_pool
from ledger.rows import LedgerRow
from metering.money import fmt_nanos
from tests.conftest import KEY, LEDGER_KEY, OTHER_KEY, gateway_config
from tests.support.asgi import Reply, call
from tests.support.postgres_server import PG_BIN, PostgresServer, installed, run_postgres
from tests.support.procs import Proc, start_gateway
from tests.support.tools import needs

pytestmark = needs(installed(), f"PostgreSQL 15 in {PG_BIN} (Debian postgresql, bootstrap.sh)")

TOLLWAY = str(Path(sys.executable).parent / "tollway")
NOWHERE = ("http://127.0.0.1:9", "http://127.0.0.1:13")  # replicas no test here calls
DAY = datetime(2026, 3, 10, tzinfo=UTC)
BULK_DAY = DAY + timedelta(days=2)
BULK = 12_345  # rows of tenant "bulk": a CSV export of several pages


def key_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


ACME_KEY, ACME_OTHER = key_id(KEY), "acme0therkey"
GLOBEX_KEY, INITECH_KEY = key_id(OTHER_KEY), key_id(LEDGER_KEY)


def us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def ledger_row(i: int, tenant: str, key: str, at: datetime, **fields: Any) -> LedgerRow:
    values: dict[str, Any] = {
        "tier": "small" if i % 3 else "large", "model": "sim-small" if i % 3 else "sim-large",
        "replica": NOWHERE[0], "endpoint": "chat", "status": 200, "error_type": None,
        "cache": "hit" if i % 5 == 0 else "miss", "prompt_tokens": 10 + i,
        "completion_tokens": i % 17, "cached_tokens": 0, "gpu_us": 1000 * i + 7,
        "cost_nanos": 123_457 * i + 1, "cost_loaded_nanos": 300_001 * i,
        "saved_nanos": 99 if i % 5 == 0 else 0, "attempts": 1, "route_score": None,
        "fallback_from": None, "duration_us": 40_000 + i, "ttft_us": None,
    }  # fmt: skip
    values.update(fields)
    return LedgerRow(us(at), f"req-{tenant}-{i:05d}", tenant, key, **values)


def known_rows() -> list[LedgerRow]:
    rows = []
    owners = [("acme", ACME_KEY), ("acme", ACME_OTHER), ("globex", GLOBEX_KEY)]
    owners.append(("initech", INITECH_KEY))
    for i in range(80):
        tenant, key = owners[i % 4]
        at = DAY + timedelta(hours=10, seconds=97 * i)  # 10:00 to about 12:10
        status = 502 if i % 11 == 0 else 200
        rows.append(ledger_row(i, tenant, key, at, status=status))
    return rows


ROWS = known_rows()
BULK_ROWS = [
    ledger_row(i, "bulk", "bulkkey", BULK_DAY + timedelta(milliseconds=3 * i)) for i in range(BULK)
]


def newest_first(rows: list[LedgerRow]) -> list[LedgerRow]:
    return sorted(rows, key=lambda r: (r.finished_us, r.request_id), reverse=True)


def config_for(url: str | None, spool: Path, **database: Any) -> dict[str, Any]:
    config = gateway_config([NOWHERE[0]], [NOWHERE[1]])
    if url is not None:
        config["database"] = {"url": url, "connect_timeout_s": 2, **database}
    config["ledger"] = {"spool_dir": str(spool)}
    return config


async def load(url: str, rows: list[LedgerRow]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await schema.migrate(conn)
        for month in store.months(rows):
            await store.ensure_partition(conn, month)
        await store.insert(conn, rows)
    finally:
        await conn.close()


class Api:
    """One gateway's app in the test's loop, with a pool on ``url`` (None: no database)."""

    def __init__(self, url: str | None, spool: Path, **database: Any) -> None:
        settings = parse_settings(config_for(url, spool, **database), "test")
        self.services = Services.build(settings)
        self.app = RequestIdMiddleware(create_api(self.services))

    async def open(self) -> None:
        if self.services.settings.database is not None:
            self.services.database = await open_pool(self.services.settings.database)

    async def close(self) -> None:
        if self.services.database is not None:
            await self.services.database.close()

    async def get(self, path: str, api_key: str | None = KEY, /, **params: Any) -> Reply:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        headers = {} if api_key is None else {"authorization": f"Bearer {api_key}"}
        return await call(self.app, "GET", f"{path}?{query}", headers=headers, timeout_s=60)

    async def ok(self, path: str, api_key: str | None = KEY, /, **params: Any) -> Any:
        reply = await self.get(path, api_key, **params)
        assert reply.status == 200, reply.body
        return reply.json()


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with run_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
async def api(
    server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    await load(server.url, ROWS + BULK_ROWS)
    api = Api(server.url, tmp_path_factory.mktemp("spool"))
    await api.open()
    yield api
    await api.close()


def sums(rows: list[LedgerRow]) -> dict[str, Any]:
    """What the API's totals must say about ``rows``: exact, from the rows themselves."""
    return {
        "requests": len(rows),
        "errors": sum(r.status >= 400 for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "cached_prompt_tokens": sum(r.cached_tokens for r in rows),
        "gpu_seconds": sum(r.gpu_us for r in rows) / 1_000_000,
        "cost_usd": fmt_nanos(sum(r.cost_nanos for r in rows)),
        "cost_loaded_usd": fmt_nanos(sum(r.cost_loaded_nanos for r in rows)),
        "saved_usd": fmt_nanos(sum(r.saved_nanos for r in rows)),
    }


def day_params(**more: Any) -> dict[str, Any]:
    return {"start": "2026-03-10", "end": "2026-03-11T00:00:00Z", **more}


# -- sums -------------------------------------------------------------------------------


async def test_an_admin_key_sees_every_tenant_and_the_sums_are_exact(api: Api) -> None:
    body = await api.ok("/v1/usage", OTHER_KEY, **day_params())
    assert body["object"] == "usage"
    assert (body["start"], body["end"]) == ("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z")
    assert body["tenant"] is None
    assert [row["key"] for row in body["data"]] == ["acme", "globex", "initech"]
    for row in body["data"]:
        assert row == {"key": row["key"], **sums([r for r in ROWS if r.tenant == row["key"]])}
    assert body["total"] == {"key": "total", **sums(ROWS)}
    # To the nano-dollar: the total is the sum of what each response's header printed.
    assert Decimal(body["total"]["cost_usd"]) == sum(Decimal(fmt_nanos(r.cost_nanos)) for r in ROWS)

    globex = await api.ok("/v1/usage", OTHER_KEY, **day_params(tenant="globex"))
    assert [row["key"] for row in globex["data"]] == ["globex"]
    assert globex["filters"] == {"tenant": "globex", "key": None, "tier": None, "model": None}


async def test_any_other_key_sees_its_own_tenant_and_may_pick_a_key(api: Api) -> None:
    acme = [r for r in ROWS if r.tenant == "acme"]
    own = await api.ok("/v1/usage", KEY, **day_params())
    assert own["tenant"] == "acme"
    assert [row["key"] for row in own["data"]] == ["acme"]
    assert own["total"] == {"key": "total", **sums(acme)}
    assert (await api.ok("/v1/usage", KEY, **day_params(tenant="acme")))["total"] == own["total"]

    by_key = await api.ok("/v1/usage", KEY, **day_params(group_by="key"))
    assert [row["key"] for row in by_key["data"]] == sorted([ACME_KEY, ACME_OTHER])
    one = await api.ok("/v1/usage", KEY, **day_params(group_by="tier", key=ACME_OTHER))
    assert one["total"] == {"key": "total", **sums([r for r in acme if r.key_id == ACME_OTHER])}
    # Another tenant's key filters to nothing: the tenant scope still applies.
    theirs = await api.ok("/v1/usage", KEY, **day_params(key=GLOBEX_KEY))
    assert (theirs["data"], theirs["total"]["requests"]) == ([], 0)

    denied = await api.get("/v1/usage", KEY, **day_params(tenant="globex"))
    assert denied.status == 403
    assert denied.json()["error"]["code"] == "permission_denied"
    assert (await api.get("/v1/usage/requests", KEY, tenant="globex")).status == 403


@pytest.mark.parametrize("group_by", ["tenant", "key", "tier", "model", "cache", "day", "hour"])
async def test_every_grouping_adds_up_to_the_total(api: Api, group_by: str) -> None:
    body = await api.ok("/v1/usage", OTHER_KEY, **day_params(group_by=group_by))
    assert body["group_by"] == group_by
    assert body["total"] == {"key": "total", **sums(ROWS)}
    assert sum(row["requests"] for row in body["data"]) == len(ROWS)
    cost = sum(Decimal(row["cost_usd"]) for row in body["data"])
    assert cost == Decimal(body["total"]["cost_usd"])
    if group_by == "hour":
        assert [row["key"] for row in body["data"]] == [
            "2026-03-10T10:00:00Z", "2026-03-10T11:00:00Z", "2026-03-10T12:00:00Z"
        ]  # fmt: skip


async def test_a_range_is_widened_to_whole_hours_and_says_so(api: Api) -> None:
    body = await api.ok("/v1/usage", OTHER_KEY, start="2026-03-10T10:30Z", end="2026-03-10T11:15")
    assert (body["start"], body["end"]) == ("2026-03-10T10:00:00Z", "2026-03-10T12:00:00Z")
    inside = [r for r in ROWS if r.finished_at < DAY + timedelta(hours=12)]
    assert body["total"]["requests"] == len(inside)
    # An offset is honoured, also when the query string turned its "+" into a space.
    shifted = await api.ok("/v1/usage", OTHER_KEY, start="2026-03-10T11:30 01:00", end="2026-03-11")
    assert shifted["start"] == "2026-03-10T10:00:00Z"
    # The ends of time are ranges too.
    ever = await api.ok("/v1/usage", OTHER_KEY, start="0001-01-01T01:00Z", end="9999-12-31T23:30Z")
    assert (ever["start"], ever["end"]) == ("0001-01-01T01:00:00Z", "9999-12-31T23:00:00Z")
    assert ever["total"]["requests"] == len(ROWS) + BULK


# -- per-request rows -----------------------------------------------------------------


async def test_requests_page_newest_first_and_stay_in_the_tenant(api: Api) -> None:
    want = newest_first([r for r in ROWS if r.tenant == "acme"])
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        body = await api.ok("/v1/usage/requests", KEY, limit=7, cursor=cursor)
        assert body["object"] == "list"
        assert len(body["data"]) <= 7
        seen += body["data"]
        assert body["has_more"] is (body["next"] is not None)
        cursor = body["next"]
        if cursor is None:
            break
    assert [row["request_id"] for row in seen] == [r.request_id for r in want]
    first = seen[0]
    row = want[0]
    assert first["finished_at"] == row.finished_at.isoformat().replace("+00:00", "Z")
    assert (first["tenant"], first["key_id"], first["status"]) == ("acme", row.key_id, row.status)
    assert first["cost_usd"] == fmt_nanos(row.cost_nanos)
    assert first["duration_ms"] == row.duration_us / 1000

    failed = await api.ok("/v1/usage/requests", KEY, status="5xx", key=ACME_KEY)
    assert [r["request_id"] for r in failed["data"]] == [
        r.request_id for r in want if r.status >= 500 and r.key_id == ACME_KEY
    ]
    assert failed["data"]
    mine = await api.ok("/v1/usage/requests", KEY, key=GLOBEX_KEY)
    assert mine["data"] == []
    since = await api.ok(
        "/v1/usage/requests", OTHER_KEY, since="2026-03-10T12:00Z", until="2026-03-11", limit=1000
    )
    assert [r["request_id"] for r in since["data"]] == [
        r.request_id for r in newest_first(ROWS) if r.finished_at >= DAY + timedelta(hours=12)
    ]
    assert since["until"] == "2026-03-11T00:00:00Z"


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/usage", {"group_by": "colour"}, "group_by"),
        ("/v1/usage", {"start": "yesterday"}, "start"),
        ("/v1/usage", {"end": "2026-13-01"}, "end"),
        ("/v1/usage", {"start": "2026-11-02", "end": "2026-11-01"}, "end"),
        ("/v1/usage", {"format": "xml"}, "format"),
        ("/v1/usage/requests", {"since": "soon"}, "since"),
        ("/v1/usage/requests", {"since": "2026-11-02", "until": "2026-11-02"}, "until"),
        ("/v1/usage/requests", {"limit": "0"}, "limit"),
        ("/v1/usage/requests", {"limit": "1001"}, "limit"),
        ("/v1/usage/requests", {"limit": "ten"}, "limit"),
        ("/v1/usage/requests", {"limit": "\u00b2"}, "limit"),
        ("/v1/usage/requests", {"limit": "9" * 5000, "format": "csv"}, "limit"),
        ("/v1/usage/requests", {"limit": "0", "format": "csv"}, "limit"),
        ("/v1/usage/requests", {"cursor": "not-a-cursor"}, "cursor"),
        ("/v1/usage/requests", {"cursor": "MTowAA"}, "cursor"),  # "1:0\x00"
        ("/v1/usage", {"start": "0001-01-01T00:00+01:00"}, "start"),
        ("/v1/usage", {"tenant": "a\x00b"}, "tenant"),
        ("/v1/usage/requests", {"model": "\x00"}, "model"),
        ("/v1/usage/requests", {"status": "6xx"}, "status"),
        ("/v1/usage/requests", {"format": "tsv"}, "format"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    api: Api, path: str, params: dict[str, str], param: str
) -> None:
    reply = await api.get(path, KEY, **params)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_no_key_is_401(api: Api) -> None:
    for path in ("/v1/usage", "/v1/usage/requests"):
        reply = await api.get(path, None)
        assert reply.status == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"


# -- CSV --------------------------------------------------------------------------------


async def test_sums_as_csv(api: Api) -> None:
    reply = await api.get("/v1/usage", OTHER_KEY, **day_params(group_by="key", format="csv"))
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/csv; charset=utf-8"
    assert reply.headers["content-disposition"] == 'attachment; filename="tollway-usage-by-key.csv"'
    lines = list(csv.DictReader(io.StringIO(reply.body.decode())))
    body = await api.ok("/v1/usage", OTHER_KEY, **day_params(group_by="key"))
    assert [line["key"] for line in lines] == [row["key"] for row in body["data"]]
    for line, row in zip(lines, body["data"], strict=True):
        assert line["cost_usd"] == row["cost_usd"]
        assert int(line["requests"]) == row["requests"]
        assert Decimal(line["gpu_seconds"]) == Decimal(str(row["gpu_seconds"]))
    assert sum(Decimal(line["cost_loaded_usd"]) for line in lines) == Decimal(
        body["total"]["cost_loaded_usd"]
    )


async def test_a_request_export_streams_every_row_once(api: Api) -> None:
    reply = await api.get("/v1/usage/requests", OTHER_KEY, tenant="bulk", format="csv")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/csv; charset=utf-8"
    assert reply.headers["content-disposition"].startswith("attachment;")
    assert "content-length" not in reply.headers  # streamed
    lines = list(csv.DictReader(io.StringIO(reply.body.decode())))
    assert [line["request_id"] for line in lines] == [r.request_id for r in newest_first(BULK_ROWS)]
    assert sum(Decimal(line["cost_usd"]) for line in lines) == Decimal(
        fmt_nanos(sum(r.cost_nanos for r in BULK_ROWS))
    )
    some = await api.get("/v1/usage/requests", OTHER_KEY, tenant="bulk", format="csv", limit=7001)
    lines = list(csv.DictReader(io.StringIO(some.body.decode())))
    assert len(lines) == 7001
    assert lines[-1]["request_id"] == newest_first(BULK_ROWS)[7000].request_id
    # Scoped like JSON: acme's export has acme's rows only.
    acme = await api.get("/v1/usage/requests", KEY, format="csv")
    tenants = {line["tenant"] for line in csv.DictReader(io.StringIO(acme.body.decode()))}
    assert tenants == {"acme"}


# -- a database that is missing, down or slow -----------------------------------------


async def test_no_database_configured_is_503(tmp_path: Path) -> None:
    api = Api(None, tmp_path)
    for path in ("/v1/usage", "/v1/usage/requests"):
        reply = await api.get(path, KEY)
        assert reply.status == 503
        error = reply.json()["error"]
        assert error["code"] == "service_unavailable"
        assert "no database configured" in error["message"]
        assert reply.headers["retry-after"] == "5"


async def test_a_stopped_database_is_503_until_it_is_back(tmp_path: Path) -> None:
    with run_postgres() as pg:
        await load(pg.url, ROWS)
        api = Api(pg.url, tmp_path)
        await api.open()
        try:
            assert (await api.ok("/v1/usage", KEY))["object"] == "usage"
            pg.stop()
            for path, params in (
                ("/v1/usage", day_params()),
                ("/v1/usage/requests", {}),
                ("/v1/usage/requests", {"format": "csv"}),
            ):
                reply = await api.get(path, KEY, **params)
                assert reply.status == 503, reply.body
                assert "PostgreSQL" in reply.json()["error"]["message"]
                assert "Traceback" not in reply.body.decode()
            pg.start()
            deadline = time.monotonic() + 15
            while (reply := await api.get("/v1/usage", KEY, **day_params())).status != 200:
                assert time.monotonic() < deadline, reply.body
                await asyncio.sleep(0.1)
            assert reply.json()["total"]["requests"] == sum(r.tenant == "acme" for r in ROWS)
        finally:
            await api.close()


async def test_a_query_past_the_statement_timeout_is_503(
    server: PostgresServer, api: Api, tmp_path: Path
) -> None:
    slow = Api(server.url, tmp_path, statement_timeout_s=0.5)
    await slow.open()
    blocker = await asyncpg.connect(server.url)
    try:
        async with blocker.transaction():
            await blocker.execute(
                "LOCK TABLE usage_hourly, usage_requests IN ACCESS EXCLUSIVE MODE"
            )
            began = time.monotonic()
            for path in ("/v1/usage", "/v1/usage/requests"):
                reply = await slow.get(path, KEY)
                assert reply.status == 503, reply.body
            assert time.monotonic() - began < 5
        assert (await slow.get("/v1/usage", KEY)).status == 200  # the lock is gone
    finally:
        await blocker.close()
        await slow.close()


async def test_an_export_the_database_drops_mid_way_ends_broken_not_short(
    tmp_path: Path,
) -> None:
    """Past the first page there is no status left to send: the body stops without its
    last chunk (the app raises, the server drops the connection), so no client takes
    a short export for a whole one."""
    with run_postgres() as pg:
        await load(pg.url, BULK_ROWS)
        api = Api(pg.url, tmp_path)
        await api.open()
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client stays
            raise AssertionError

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and len(sent) == 2:
                pg.stop()  # after the first page went out

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": "/v1/usage/requests", "raw_path": b"/v1/usage/requests",
            "query_string": b"tenant=bulk&format=csv", "root_path": "", "state": {},
            "headers": [(b"authorization", f"Bearer {OTHER_KEY}".encode())],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
        }  # fmt: skip
        try:
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await asyncio.wait_for(api.app(scope, receive, send), 30)
        finally:
            await api.close()
        assert sent[0]["status"] == 200
        bodies = [m for m in sent if m["type"] == "http.response.body"]
        assert all(m.get("more_body") for m in bodies)  # never the end of the body
        text = b"".join(m["body"] for m in bodies).decode()
        assert text.count("\r\n") == 5001  # the header and the first page only


# -- tollway usage, against real gateways ---------------------------------------------


@pytest.fixture(scope="module")
def gateways(
    api: Api, server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Proc]]:
    log_dir = tmp_path_factory.mktemp("gateways")
    started: list[Proc] = []
    try:
        for n in range(2):
            spool = tmp_path_factory.mktemp(f"spool{n}")
            started.append(start_gateway(log_dir, config_for(server.url, spool)))
        yield started
    finally:
        for proc in started:
            proc.stop()


def tollway(gateway: Proc, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [TOLLWAY, "usage", "--url", gateway.url, "--api-key", key, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_every_gateway_gives_the_same_answer(gateways: list[Proc]) -> None:
    answers = [
        tollway(gateway, OTHER_KEY, "--json", "--start", "2026-03-10") for gateway in gateways
    ]
    assert all(a.returncode == 0 for a in answers), [a.stderr for a in answers]
    assert answers[0].stdout == answers[1].stdout
    listed = [tollway(gateway, OTHER_KEY, "--requests", "--json", "--limit", "1500")
              for gateway in gateways]  # fmt: skip
    assert listed[0].stdout == listed[1].stdout


def test_cli_prints_sums_as_a_table(gateways: list[Proc]) -> None:
    result = tollway(gateways[0], KEY, "--group-by", "key", "--start", "2026-03-10", "--end",
                     "2026-03-11")  # fmt: skip
    assert result.returncode == 0, result.stderr
    title, header, *rows, last = result.stdout.splitlines()
    assert title == "usage 2026-03-10T00:00:00Z .. 2026-03-11T00:00:00Z tenant=acme"
    assert header.split()[:4] == ["key", "requests", "errors", "prompt_tokens"]
    assert sorted(line.split()[0] for line in rows) == sorted([ACME_KEY, ACME_OTHER])
    acme = sums([r for r in ROWS if r.tenant == "acme"])
    assert last.split() == [
        "TOTAL", str(acme["requests"]), str(acme["errors"]), str(acme["prompt_tokens"]),
        str(acme["completion_tokens"]), f"{acme['gpu_seconds']:.3f}", acme["cost_usd"],
        acme["cost_loaded_usd"], acme["saved_usd"],
    ]  # fmt: skip


def test_cli_lists_requests_and_says_where_to_go_on(gateways: list[Proc]) -> None:
    want = newest_first([r for r in ROWS if r.tenant == "acme"])
    result = tollway(gateways[0], KEY, "--requests", "--limit", "5")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["finished_at", "request_id", "tenant"]
    assert [line.split()[1] for line in rows] == [r.request_id for r in want[:5]]
    assert "--cursor " in result.stderr
    cursor = result.stderr.rsplit("--cursor ", 1)[1].strip()
    more = tollway(gateways[1], KEY, "--requests", "--limit", "1000", "--cursor", cursor)
    assert more.returncode == 0, more.stderr
    assert [line.split()[1] for line in more.stdout.splitlines()[1:]] == [
        r.request_id for r in want[5:]
    ]
    assert more.stderr == ""
    rest = tollway(gateways[0], KEY, "--requests", "--csv", "--cursor", cursor)
    assert rest.returncode == 0, rest.stderr
    lines = list(csv.DictReader(io.StringIO(rest.stdout)))
    assert [line["request_id"] for line in lines] == [r.request_id for r in want[5:]]


def test_cli_writes_the_csv(gateways: list[Proc]) -> None:
    sums_csv = tollway(gateways[0], OTHER_KEY, "--csv", "--group-by", "day", "--start",
                       "2026-03-01", "--end", "2026-04-01")  # fmt: skip
    assert sums_csv.returncode == 0, sums_csv.stderr
    lines = list(csv.DictReader(io.StringIO(sums_csv.stdout)))
    assert [line["day"] for line in lines] == ["2026-03-10", "2026-03-12"]
    assert int(lines[1]["requests"]) == BULK

    rows = tollway(gateways[1], OTHER_KEY, "--requests", "--csv", "--tenant", "bulk")
    assert rows.returncode == 0, rows.stderr
    parsed = list(csv.DictReader(io.StringIO(rows.stdout)))
    assert len(parsed) == BULK
    assert len({line["request_id"] for line in parsed}) == BULK


def test_cli_errors_are_one_line_and_exit_1(gateways: list[Proc]) -> None:
    denied = tollway(gateways[0], KEY, "--tenant", "globex")
    assert denied.returncode == 1
    assert denied.stderr.startswith("tollway: 403: ")
    bad = tollway(gateways[0], KEY, "--requests", "--since", "whenever")
    assert (bad.returncode, bad.stderr.split(":")[:2]) == (1, ["tollway", " 400"])
    misplaced = tollway(gateways[0], KEY, "--limit", "5")
    assert misplaced.returncode == 1
    assert "--requests" in misplaced.stderr
