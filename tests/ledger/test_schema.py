"""Schema versions: migrating from nothing and from the previous version, and the start check."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import openai
import pytest
import yaml

from gateway.config import DatabaseConfig
from ledger import schema, store
from ledger.database import connect
from ledger.rows import LedgerRow
from metering.report import RequestReport
from tests.conftest import FAST_SIM, KEY, gateway_config, with_ledger
from tests.support.postgres_server import PostgresServer, run_postgres
from tests.support.procs import BIN, Proc, start_gateway, start_sim


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with run_postgres() as pg:
        yield pg


@pytest.fixture
async def conn(server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    server.reset()  # an empty database for each test
    connection = await connect(DatabaseConfig(url=server.url))
    try:
        yield connection
    finally:
        await connection.close()


def tollway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tollway"), *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_migrating_an_empty_database_applies_every_version_once(
    conn: asyncpg.Connection, server: PostgresServer
) -> None:
    with pytest.raises(schema.SchemaError, match="run `tollway db migrate`"):
        await schema.check(conn)
    first = tollway("db", "migrate", "--database-url", server.url)
    assert first.returncode == 0, first.stderr
    assert [line.split()[-1] for line in first.stdout.splitlines()[:-1]] == [
        f"{m.version:04d}_{m.name}" for m in schema.migrations()
    ]
    again = tollway("db", "migrate", "--database-url", server.url)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    assert await schema.check(conn) == schema.latest()
    assert await schema.applied(conn) == list(range(1, schema.latest() + 1))
    status = tollway("db", "status", "--database-url", server.url)
    assert (status.returncode, status.stdout.split()[1]) == (0, str(schema.latest()))


async def test_migrating_from_the_previous_version_keeps_the_rows(
    conn: asyncpg.Connection,
) -> None:
    previous = schema.latest() - 1
    await schema.migrate(conn, upto=previous)
    assert await schema.applied(conn) == list(range(1, previous + 1))
    with pytest.raises(schema.SchemaError, match=f"at version {previous} and this gateway needs"):
        await schema.check(conn)
    await conn.execute(
        "CREATE TABLE usage_requests_y2026m01 PARTITION OF usage_requests"
        " FOR VALUES FROM ('2026-01-01') TO ('2026-02-01')"
    )
    await conn.execute(
        "INSERT INTO usage_requests (finished_at, request_id, tenant, key_id, tier, model,"
        " replica, endpoint, status, cache, prompt_tokens, completion_tokens, cached_tokens,"
        " gpu_us, cost_nanos, cost_loaded_nanos, saved_nanos, attempts, duration_us)"
        " VALUES ('2026-01-15T10:00:00Z', 'old-row', 'acme', 'k', 'small', 'm', 'http://r',"
        " 'chat', 200, 'miss', 10, 5, 0, 1234, 99, 120, 0, 1, 5000)"
    )
    await conn.execute(
        "INSERT INTO api_keys (id, name, tenant, digest, hint)"
        " VALUES ('key_old', 'old', 'acme', sha256('old'::bytea), 'abcd')"
    )
    applied = await schema.migrate(conn)
    assert [m.version for m in applied] == list(range(previous + 1, schema.latest() + 1))
    assert await schema.check(conn) == schema.latest()
    row = await conn.fetchrow("SELECT tenant, cost_nanos FROM usage_requests")
    assert row is not None
    assert (row["tenant"], row["cost_nanos"]) == ("acme", 99)
    key = await conn.fetchrow("SELECT * FROM api_keys")
    assert key is not None
    assert (key["id"], key["name"], key["tenant"]) == ("key_old", "old", "acme")
    assert key["requests_per_minute"] is None  # a key made before limits existed has none


async def test_a_newer_schema_than_the_code_knows_is_refused(conn: asyncpg.Connection) -> None:
    await schema.migrate(conn)
    await conn.execute("INSERT INTO tollway_schema (version, name) VALUES ($1, 'future')",
                       schema.latest() + 1)  # fmt: skip
    with pytest.raises(schema.SchemaError, match="newer than this gateway knows"):
        await schema.check(conn)
    with pytest.raises(schema.SchemaError, match="newer than this gateway knows"):
        await schema.migrate(conn)


async def test_a_gateway_refuses_to_start_on_an_unmigrated_database(
    conn: asyncpg.Connection, server: PostgresServer, log_dir: Path, tmp_path: Path
) -> None:
    upstreams = gateway_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"])
    path = tmp_path / "tollway.yaml"
    path.write_text(yaml.safe_dump(with_ledger(upstreams, server, tmp_path / "spool")))
    started = tollway("serve", "--config", str(path), "--port", "1")
    assert started.returncode == 2
    assert "database: the database has no tollway schema" in started.stderr
    assert "tollway db migrate" in started.stderr
    assert "Traceback" not in started.stderr
    await schema.migrate(conn, upto=schema.latest() - 1)  # behind: refused too
    behind = tollway("serve", "--config", str(path), "--port", "1")
    assert behind.returncode == 2
    assert f"needs {schema.latest()}: run `tollway db migrate`" in behind.stderr


def test_a_gateway_starts_with_the_database_down_and_writes_its_rows_when_it_is_back(
    server: PostgresServer, procs: list[Proc], log_dir: Path, tmp_path: Path
) -> None:
    server.reset()
    assert tollway("db", "migrate", "--database-url", server.url).returncode == 0
    sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
    procs += sims
    config = with_ledger(gateway_config([sims[0].url], [sims[1].url]), server, tmp_path / "sp")
    server.stop()
    try:
        gateway = start_gateway(log_dir, config)
        procs.append(gateway)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        ids = [
            client.chat.completions.with_raw_response.create(
                model="sim-small", messages=[{"role": "user", "content": f"down {i}"}],
                max_tokens=4,
            ).headers["x-tollway-request-id"]
            for i in range(5)
        ]  # fmt: skip
    finally:
        server.start()
    deadline = time.monotonic() + 20
    while True:
        found = server.psql("SELECT request_id FROM usage_requests ORDER BY request_id")
        if sorted(ids) == found.split():
            break
        assert time.monotonic() < deadline, f"rows never written: {found!r} vs {ids}"
        time.sleep(0.2)


async def test_prune_drops_whole_months_past_the_retention_and_keeps_the_rest(
    conn: asyncpg.Connection, server: PostgresServer, tmp_path: Path
) -> None:
    await schema.migrate(conn)
    now = datetime.now(UTC)
    months = []
    for back in range(4):  # this month and the three before
        index = now.year * 12 + now.month - 1 - back
        months.append((index // 12, index % 12 + 1))
    rows = [
        LedgerRow.of(RequestReport(f"r{y}{m}", "acme", "small", "m", "chat", finished_us=int(
            datetime(y, m, 2, tzinfo=UTC).timestamp() * 1_000_000)))
        for y, m in months
    ]  # fmt: skip
    for month in store.months(rows):
        await store.ensure_partition(conn, month)
    assert await store.insert(conn, rows) == 4
    path = tmp_path / "tollway.yaml"
    upstreams = gateway_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"])
    path.write_text(yaml.safe_dump(with_ledger(upstreams, server, tmp_path / "spool")))
    pruned = tollway("db", "prune", "--config", str(path), "--keep-months", "2")
    assert pruned.returncode == 0, pruned.stderr
    assert await store.months_present(conn) == sorted(months[:2])
    left = await conn.fetch("SELECT request_id FROM usage_requests ORDER BY request_id")
    assert sorted(r["request_id"] for r in left) == sorted(r.request_id for r in rows[:2])
    hours = await conn.fetchval("SELECT count(*) FROM usage_hourly")
    assert hours == 2
