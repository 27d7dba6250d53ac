"""``tollway db``: create and upgrade the database schema, show its version, rebuild
Redis's spend counters from the ledger, and drop months past the retention.

The database comes from ``--database-url``, else ``--config``'s ``database.url``,
else ``TOLLWAY_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from cache.redis_client import RedisClient
from cache.spend import SpendCounters
from gateway.config import ConfigError, DatabaseConfig, RedisConfig, Settings, load_settings
from ledger import counters, schema, store
from ledger.database import UNREACHABLE, Conn, connect


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", required=True)
    for name, run, text in (
        ("migrate", _migrate, "apply the schema migrations the database lacks"),
        ("status", _status, "print the schema version: applied, and known to this tollway"),
    ):
        command = sub.add_parser(name, help=text)
        add_database_args(command)
        command.set_defaults(func=run)
    rebuild = sub.add_parser(
        "rebuild-counters",
        help="raise Redis's spend counters (budgets) to the ledger's figures, e.g. after "
        "Redis lost its data",
    )
    rebuild.add_argument("--config", required=True, help="a tollway.yaml: its database and redis")
    rebuild.set_defaults(func=_rebuild_counters)
    prune = sub.add_parser(
        "prune", help="drop the ledger's months older than ledger.retention_months (export first)"
    )
    prune.add_argument("--config", required=True, help="a tollway.yaml: its database and ledger")
    prune.add_argument("--keep-months", type=int, help="overrides ledger.retention_months")
    prune.set_defaults(func=_prune)


def add_database_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a tollway.yaml whose database.url to use")
    parser.add_argument("--database-url", help="postgresql://... (overrides --config)")


def database_config(args: argparse.Namespace) -> DatabaseConfig:
    """The database the command names; ``SystemExit`` with a message if it names none."""
    if args.database_url:
        return DatabaseConfig(url=args.database_url)
    if args.config:
        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            raise SystemExit(f"tollway: {exc}") from None
        if settings.database is None:
            raise SystemExit(f"tollway: {args.config} has no database section")
        return settings.database
    url = os.environ.get("TOLLWAY_DATABASE_URL")
    if not url:
        raise SystemExit(
            "tollway: name the database: --database-url, --config or TOLLWAY_DATABASE_URL"
        )
    return DatabaseConfig(url=url)


@contextlib.asynccontextmanager
async def _connected(config: DatabaseConfig) -> AsyncIterator[Conn]:
    """A connection for one command, closed after; exit 1 if the database does not answer."""
    try:
        conn = await connect(config)
    except UNREACHABLE as exc:
        print(f"tollway: cannot reach the database: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        yield conn
    finally:
        await conn.close()


def _settings_with_database(path: str) -> tuple[Settings, DatabaseConfig]:
    """The config at ``path`` and its database; exit 2 (a message) if it names none."""
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.database is None:
        print(f"tollway: {path} has no database section", file=sys.stderr)
        raise SystemExit(2)
    return settings, settings.database


def _migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_run_migrate(database_config(args)))


async def _run_migrate(config: DatabaseConfig) -> int:
    async with _connected(config) as conn:
        try:
            done = await schema.migrate(conn)
        except schema.SchemaError as exc:
            print(f"tollway: {exc}", file=sys.stderr)
            return 1
    for migration in done:
        print(f"applied {migration.version:04d}_{migration.name}")
    print(f"schema at version {schema.latest()}" + ("" if done else " (nothing to do)"))
    return 0


def _status(args: argparse.Namespace) -> int:
    return asyncio.run(_run_status(database_config(args)))


async def _run_status(config: DatabaseConfig) -> int:
    async with _connected(config) as conn:
        applied = await schema.applied(conn)
    have = applied[-1] if applied else 0
    print(f"applied: {have}  known to this tollway: {schema.latest()}")
    return 0 if have == schema.latest() else 3


def _rebuild_counters(args: argparse.Namespace) -> int:
    settings, database = _settings_with_database(args.config)
    return asyncio.run(_run_rebuild(database, settings.redis))


async def _run_rebuild(database: DatabaseConfig, redis_config: RedisConfig) -> int:
    redis = RedisClient(redis_config.url, cluster=redis_config.cluster)
    await redis.start()
    try:
        async with _connected(database) as conn:
            rebuilt = await counters.rebuild(conn, SpendCounters(redis))
    except ConnectionError as exc:
        print(f"tollway: {exc} ({redis_config.url})", file=sys.stderr)
        return 1
    finally:
        await redis.close()
    print(f"spend counters rebuilt from the ledger: {rebuilt} day and month sums")
    return 0


def _prune(args: argparse.Namespace) -> int:
    settings, database = _settings_with_database(args.config)
    keep = args.keep_months or settings.ledger.retention_months
    if keep < 1:
        print("tollway: --keep-months must be at least 1", file=sys.stderr)
        return 2
    return asyncio.run(_run_prune(database, keep))


async def _run_prune(database: DatabaseConfig, keep: int) -> int:
    """Keep the current month and the ``keep - 1`` before it."""
    today = datetime.now(UTC)
    index = today.year * 12 + today.month - 1 - (keep - 1)
    oldest_kept = (index // 12, index % 12 + 1)
    async with _connected(database) as conn:
        dropped = await store.drop_before(conn, oldest_kept)
    for year, month in dropped:
        print(f"dropped {year:04d}-{month:02d}")
    print(f"kept from {oldest_kept[0]:04d}-{oldest_kept[1]:02d} on")
    return 0
