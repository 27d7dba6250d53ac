"""The database schema's versions: the migrations, applying them, and checking them at start.

Migrations are the SQL files in ``ledger/migrations``, named ``NNNN_name.sql``
and applied in order, each in its own transaction together with its row in
``tollway_schema``. ``tollway db migrate`` applies what is missing (under an
advisory lock, so two at once are one); a gateway only checks (``check``)
and refuses to start on a schema that is behind it or newer than it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ledger.database import Conn

VERSIONS_TABLE = "tollway_schema"
_LOCK = 0x7011_3A7F  # pg_advisory_xact_lock key: one migrator at a time
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


class SchemaError(Exception):
    """The database's schema is not the one this gateway knows; the message says what to do."""


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with this version of tollway, oldest first."""
    found = []
    for entry in resources.files("ledger").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"ledger/migrations are not numbered 1..n: {[m.name for m in found]}")
    return tuple(found)


def latest() -> int:
    return migrations()[-1].version


async def applied(conn: Conn) -> list[int]:
    """The versions applied to the database, oldest first (empty: no tollway schema yet)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSIONS_TABLE)
    if not exists:
        return []
    rows = await conn.fetch(f"SELECT version FROM {VERSIONS_TABLE} ORDER BY version")
    return [int(r["version"]) for r in rows]


async def migrate(conn: Conn, upto: int | None = None) -> list[Migration]:
    """Apply the missing migrations (up to ``upto``); the ones applied now, in order."""
    done: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = set(await applied(conn))
        newest = max(have, default=0)
        if newest > latest():
            raise SchemaError(_newer(newest))
        for migration in migrations():
            if migration.version in have or (upto is not None and migration.version > upto):
                continue
            async with conn.transaction():  # a savepoint: the file and its row together
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {VERSIONS_TABLE} (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            done.append(migration)
    return done


async def check(conn: Conn) -> int:
    """The schema's version if it is exactly the one this gateway knows; else ``SchemaError``."""
    have = await applied(conn)
    if not have:
        raise SchemaError(
            "the database has no tollway schema: run `tollway db migrate` against it first"
        )
    newest = have[-1]
    if newest > latest():
        raise SchemaError(_newer(newest))
    if newest < latest():
        raise SchemaError(
            f"the database schema is at version {newest} and this gateway needs {latest()}: "
            "run `tollway db migrate`"
        )
    return newest


def _newer(version: int) -> str:
    return (
        f"the database schema is at version {version}, newer than this gateway knows "
        f"({latest()}): upgrade the gateway (or point it at another database)"
    )
