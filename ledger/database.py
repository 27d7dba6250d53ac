"""The connection pool to PostgreSQL, owned by the app's lifespan.

Every connection runs in UTC (the ledger's hours and months are UTC) with a
statement timeout, so a slow query answers 503 instead of holding a worker.
"""

from __future__ import annotations

import asyncpg
import asyncpg.pool

from gateway.config import DatabaseConfig
from ledger import schema

Pool = asyncpg.Pool
# A connection of its own or one borrowed from the pool: the queries take either.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def server_settings(config: DatabaseConfig) -> dict[str, str]:
    return {
        "timezone": "UTC",
        "statement_timeout": str(int(config.statement_timeout_s * 1000)),
        "application_name": "tollway",
    }


async def connect(config: DatabaseConfig) -> asyncpg.Connection:
    """One connection (the CLI's, and the schema check's)."""
    conn: asyncpg.Connection = await asyncpg.connect(
        config.url, timeout=config.connect_timeout_s, server_settings=server_settings(config)
    )
    return conn


async def open_pool(config: DatabaseConfig) -> Pool:
    """A pool that opens its connections lazily: a gateway starts while the database is down."""
    pool = await asyncpg.create_pool(
        config.url,
        min_size=0,
        max_size=config.pool_size,
        timeout=config.connect_timeout_s,
        server_settings=server_settings(config),
    )
    return pool


# What a database that is down or unreachable raises: the ledger waits (rows stay in the
# spool), keys stay as last loaded; anything else is a bug or a schema problem.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


async def check_schema(config: DatabaseConfig) -> int | None:
    """The schema's version if the database answers and its schema is the one this code
    knows; None if it does not answer; ``schema.SchemaError`` if its schema is another."""
    try:
        conn = await connect(config)
    except UNREACHABLE:
        return None
    try:
        return await schema.check(conn)
    finally:
        await conn.close()
