"""tests/support/postgres_server.py: the real PostgreSQL the ledger's tests run against.

It must come up fast, answer on loopback as ``tollway``, survive a SIGKILL with
its committed rows (and none of its uncommitted ones), stop, and leave nothing
behind."""

from __future__ import annotations

import os
import pwd
import socket
import time
from pathlib import Path

import asyncpg
import pytest

from tests.support.postgres_server import OS_USER, PG_BIN, installed, run_postgres
from tests.support.tools import needs

pytestmark = needs(installed(), f"PostgreSQL 15 in {PG_BIN} (Debian postgresql, bootstrap.sh)")


def refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def postmaster_pids(datadir: Path) -> list[int]:
    """Processes whose command line names this data dir (the postmaster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(datadir).encode() in cmdline:
                found.append(int(entry.name))
    return found


async def test_starts_fast_answers_on_loopback_and_stops() -> None:
    began = time.monotonic()
    with run_postgres() as server:
        startup = time.monotonic() - began
        assert startup < 10, f"startup took {startup:.1f} s"
        assert server.url == f"postgresql://tollway@127.0.0.1:{server.port}/tollway"
        assert server.psql("SELECT current_user, current_database()") == "tollway|tollway"
        assert server.psql("SHOW server_version_num").startswith("15")
        assert server.psql("SHOW listen_addresses") == "127.0.0.1"
        if os.geteuid() == 0:  # PostgreSQL refuses root: the server runs as postgres
            assert server.datadir.stat().st_uid == pwd.getpwnam(OS_USER).pw_uid
        conn = await asyncpg.connect(server.url)  # the URL is what the gateway is given
        try:
            assert await conn.fetchval("SELECT 1 + 1") == 2
        finally:
            await conn.close()
        server.stop()
        assert not server.running
        assert refuses(server.port)
        assert not postmaster_pids(server.datadir)
        server.start()  # a clean restart, same port
        assert server.psql("SELECT 1") == "1"
        datadir, workdir = server.datadir, server.workdir
    assert not postmaster_pids(datadir)
    assert not workdir.exists()


async def test_kill_9_then_restart_keeps_committed_rows_only() -> None:
    with run_postgres() as server:
        server.psql("CREATE TABLE rows (id int PRIMARY KEY); INSERT INTO rows SELECT 1;")
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute("INSERT INTO rows VALUES (2)")  # committed
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO rows VALUES (3)")  # never committed
            server.kill()
            assert not server.running
            assert refuses(server.port)
            assert not postmaster_pids(server.datadir)
            with pytest.raises((asyncpg.PostgresConnectionError, OSError)):
                await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()
        began = time.monotonic()
        server.start()
        assert time.monotonic() - began < 10
        assert server.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM rows") == "1,2"
        assert "automatic recovery in progress" in server.log.read_text()
        server.kill()  # twice in a row, and a crash right after recovery, are fine too
        server.start()
        assert server.psql("SELECT count(*) FROM rows") == "2"


async def test_reset_empties_the_database_even_with_clients_connected() -> None:
    with run_postgres() as server:
        server.psql("CREATE TABLE leftover (x int)")
        conn = await asyncpg.connect(server.url)
        try:
            began = time.monotonic()
            server.reset()
            assert time.monotonic() - began < 5
        finally:
            conn.terminate()
        assert server.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'leftover'") == "0"
        assert server.psql("SELECT current_database()") == "tollway"


def test_psql_returns_every_statement_and_raises_on_an_error() -> None:
    with run_postgres() as server:
        assert server.psql("SELECT 1; SELECT 'a', 'b';") == "1\na|b"
        with pytest.raises(RuntimeError, match="no_such_table"):
            server.psql("SELECT * FROM no_such_table")
