"""The ledger under faults: a store killed under load, then the gateway itself.

Real processes throughout: this module's own PostgreSQL and Redis, two
simulator replicas and a gateway per test, driven by 12 async SDK clients
(``tests.support.load``) that tag every request with its own ``x-request-id``,
so the ledger's rows are compared with the ids of the requests served, exactly.
Each test has its own tenant, whose rows are its rows.

- PostgreSQL SIGKILLed for 10 s, then started again: every request served has
  exactly one row; ``tollway_ledger_spool_rows`` held the outage's rows and
  went back to 0.
- Redis killed for 10 s: the same.
- The gateway SIGKILLed under load and started again on the same spool: the
  new process writes the rows the old one left in the spool, and the served
  requests missing from the database are within the documented bound, the
  rows of the last un-synced interval: at most ``ceil(rate x
  (ledger.sync_interval_s + 0.1 s)) + concurrency`` (the requests answered but
  not yet settled). To be sure rows *are* waiting in the spool at the kill
  (the writer otherwise empties it every ``write_interval_s``), the test holds
  a lock that stalls the gateway's inserts for its last 150 answers (under a
  second); the dead process's stalled insert then commits, and the new
  process's insert of the same rows must store nothing twice.

Every test also asserts that no row is stored twice, that the hourly sums count
each row once, and that no row was dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.config import LedgerConfig
from tests.conftest import FAST_SIM, gateway_config, migrate_database, with_ledger
from tests.support.load import Load
from tests.support.metrics import scrape, value
from tests.support.postgres_server import PostgresServer, run_postgres
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.redis_server import RedisServer, run_redis

CONCURRENCY = 12
OUTAGE_S = 10.0
SYNC_INTERVAL_S = LedgerConfig().sync_interval_s  # the default (not set here): what users get
SYNC_SLACK_S = 0.1  # the documented bound's allowance for one append and fsync
TENANTS = {"postgres": "pg-outage", "redis": "redis-outage", "sigkill": "sigkill"}


def key_of(tenant: str) -> str:
    return f"sk-test-{tenant}-key"


@dataclass
class World:
    postgres: PostgresServer
    redis: RedisServer
    config: dict[str, Any]  # the gateways' config, without the ledger
    log_dir: Path


@pytest.fixture(scope="module")
def world(log_dir: Path) -> Iterator[World]:
    with run_postgres() as postgres, run_redis() as redis:
        migrate_database(postgres.url)
        sims: list[Proc] = []
        try:
            for model in ("sim-small", "sim-large"):
                sims.append(start_sim(log_dir, [model], "--max-num-seqs", "32", *FAST_SIM))
            config = gateway_config([sims[0].url], [sims[1].url], redis.url)
            for tier in config["tiers"]:
                for replica in tier["replicas"]:
                    replica["max_num_seqs"] = 32  # the load is not queued in the gateway
            config["auth"]["keys"] += [{"key": key_of(t), "tenant": t} for t in TENANTS.values()]
            yield World(postgres, redis, config, log_dir)
        finally:
            for sim in sims:
                sim.stop()


def gateway(
    world: World, spool: Path, procs: list[Proc], log_dir: Path | None = None, **kwargs: Any
) -> Proc:
    config = with_ledger(world.config, world.postgres, spool)
    started = start_gateway(log_dir or world.log_dir, config, **kwargs)
    procs.append(started)
    return started


# -- what the gateway and the database say ---------------------------------------------------


async def spool_rows(gw: Proc) -> float:
    """``tollway_ledger_spool_rows`` (a scrape also hands the recorder's rows to the ledger)."""
    return value(await asyncio.to_thread(scrape, gw.url), "tollway_ledger_spool_rows")


async def metric(gw: Proc, name: str) -> float:
    return value(await asyncio.to_thread(scrape, gw.url), name)


async def wait_spool(gw: Proc, at_most: float = 0, within_s: float = 30.0) -> float:
    """Until at most ``at_most`` rows wait for the database (0: every row the gateway
    holds is in it); how long that took."""
    started = time.monotonic()
    while (rows := await spool_rows(gw)) > at_most:
        if time.monotonic() - started > within_s:
            raise AssertionError(f"{rows} ledger rows still wait after {within_s} s:\n"
                                 + gw.log_tail())  # fmt: skip
        await asyncio.sleep(0.1)
    return time.monotonic() - started


@dataclass
class Stored:
    ids: collections.Counter[str]  # request id -> rows with it
    rows: int
    distinct: int
    hourly_requests: int  # what usage_hourly counts for the tenant


async def stored(postgres: PostgresServer, tenant: str) -> Stored:
    conn = await asyncpg.connect(postgres.url)
    try:
        ids = await conn.fetch("SELECT request_id FROM usage_requests WHERE tenant = $1", tenant)
        counts = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM usage_requests "
            "WHERE tenant = $1",
            tenant,
        )
        hourly = await conn.fetchval(
            "SELECT coalesce(sum(requests), 0) FROM usage_hourly WHERE tenant = $1", tenant
        )
    finally:
        await conn.close()
    assert counts is not None
    return Stored(
        collections.Counter(r["request_id"] for r in ids), counts["n"], counts["d"], int(hourly)
    )


def assert_once_each(found: Stored) -> None:
    assert [rid for rid, n in found.ids.items() if n > 1] == []
    assert found.rows == found.distinct == len(found.ids)
    assert found.hourly_requests == found.rows  # a row written twice is summed once


async def assert_every_served_once(world: World, load: Load, tenant: str) -> Stored:
    """Every request was answered 200, and each has exactly one row: no more, no fewer."""
    assert dict(load.statuses) == {200: len(load.served)}, dict(load.statuses)
    assert not load.unanswered, dict(load.unanswered)
    found = await stored(world.postgres, tenant)
    assert_once_each(found)
    missing = set(load.served) - set(found.ids)
    extra = set(found.ids) - set(load.served)
    assert (len(missing), len(extra)) == (0, 0), (sorted(missing)[:10], sorted(extra)[:10])
    return found


# -- the stores down under load --------------------------------------------------------------


async def test_postgres_killed_under_load_loses_no_row(
    world: World, procs: list[Proc], tmp_path: Path
) -> None:
    tenant = TENANTS["postgres"]
    gw = gateway(world, tmp_path / "spool", procs)
    async with Load(gw.url, key_of(tenant), concurrency=CONCURRENCY, tag="pg") as load:
        await load.wait_served(300)
        before = await spool_rows(gw)
        await asyncio.to_thread(world.postgres.kill)
        down_at = time.monotonic()
        try:
            await asyncio.sleep(OUTAGE_S)  # the outage itself
            waiting = await spool_rows(gw)
            served_down = load.served_between(down_at, time.monotonic())
        finally:
            await asyncio.to_thread(world.postgres.start)
        outage_s = time.monotonic() - down_at
        # Under load still, the backlog is written (the writer retries at most 5 s apart).
        caught_up_s = await wait_spool(gw, at_most=waiting / 4)
    rate = len(load.served) / (load.stopped_at - load.started_at)
    drain_s = await wait_spool(gw)
    found = await assert_every_served_once(world, load, tenant)
    assert await metric(gw, "tollway_ledger_rows_dropped_total") == 0
    assert await metric(gw, "tollway_ledger_rows_written_total") >= found.rows
    print(
        f"\npostgres down {outage_s:.1f} s under {CONCURRENCY} clients at {rate:.0f} req/s: "
        f"{len(load.served)} served, {served_down} while down; spool rows {before:.0f} before, "
        f"{waiting:.0f} at the end of the outage, under a quarter of that {caught_up_s:.1f} s "
        f"after it (under load), 0 {drain_s:.1f} s after the load stopped"
    )
    # The outage's rows waited in the spool: all but those answered and not yet settled.
    assert waiting >= served_down - CONCURRENCY > 0


async def test_redis_killed_under_load_loses_no_row(
    world: World, procs: list[Proc], tmp_path: Path
) -> None:
    tenant = TENANTS["redis"]
    gw = gateway(world, tmp_path / "spool", procs)
    async with Load(gw.url, key_of(tenant), concurrency=CONCURRENCY, tag="redis") as load:
        await load.wait_served(300)
        await asyncio.to_thread(world.redis.stop)
        down_at = time.monotonic()
        try:
            await asyncio.sleep(OUTAGE_S)
            served_down = load.served_between(down_at, time.monotonic())
        finally:
            await asyncio.to_thread(world.redis.start)
        outage_s = time.monotonic() - down_at
        await load.wait_served(len(load.served) + 300)  # and on, with Redis back
    rate = len(load.served) / (load.stopped_at - load.started_at)
    drain_s = await wait_spool(gw)
    await assert_every_served_once(world, load, tenant)
    assert await metric(gw, "tollway_ledger_rows_dropped_total") == 0
    print(
        f"\nredis down {outage_s:.1f} s under {CONCURRENCY} clients at {rate:.0f} req/s: "
        f"{len(load.served)} served, {served_down} while down; spool empty "
        f"{drain_s:.1f} s after the load stopped"
    )
    assert served_down > 0  # the outage was under load


# -- the gateway SIGKILLed -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def inserts_stalled(postgres: PostgresServer) -> AsyncIterator[None]:
    """Hold a lock that makes the ledger's inserts wait (reads go on) until the block ends."""
    conn = await asyncpg.connect(postgres.url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE usage_requests IN SHARE MODE")
            yield
    finally:
        await conn.close()


async def test_gateway_sigkilled_under_load_loses_at_most_the_unsynced_rows(
    world: World, procs: list[Proc], tmp_path: Path
) -> None:
    tenant = TENANTS["sigkill"]
    spool = tmp_path / "spool"
    first = gateway(world, spool, procs)
    load = Load(first.url, key_of(tenant), concurrency=CONCURRENCY, tag="kill")
    async with load:
        await load.wait_served(300)
        async with inserts_stalled(world.postgres):
            stalled_at = time.monotonic()
            await load.wait_served(len(load.served) + 150)
            first.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            await load.stop()  # requests in flight fail: the gateway is gone
        # The dead process's stalled insert may now commit: the next one must not store it twice.
    served_stalled = load.served_between(stalled_at, killed_at)
    rate = len(load.served) / (killed_at - load.started_at)

    port = int(first.url.rsplit(":", 1)[1])
    # The same config, port and spool (its own log: the first one's is kept).
    restarted = world.log_dir / "restarted"
    restarted.mkdir(exist_ok=True)
    second = gateway(world, spool, procs, restarted, port=port)
    drain_s = await wait_spool(second)
    from_spool = await metric(second, "tollway_ledger_rows_written_total")  # it served none

    found = await stored(world.postgres, tenant)
    assert_once_each(found)
    served = set(load.served)
    missing = served - set(found.ids)
    unanswered = set(found.ids) - served  # settled, but killed before the answer was read
    assert unanswered <= set(load.sent)
    bound = math.ceil(rate * (SYNC_INTERVAL_S + SYNC_SLACK_S)) + CONCURRENCY
    ages = sorted(
        killed_at - at
        for rid, at in zip(load.served, load.served_at, strict=True)
        if rid in missing
    )
    print(
        f"\ngateway SIGKILLed under {CONCURRENCY} clients at {rate:.0f} req/s after "
        f"{killed_at - load.started_at:.1f} s: {len(served)} served, {len(missing)} missing "
        f"(bound {bound}: ceil({rate:.0f} x {SYNC_INTERVAL_S + SYNC_SLACK_S:.1f}) + "
        f"{CONCURRENCY}), answered at most {max(ages, default=0):.3f} s before the kill; "
        f"{len(unanswered)} stored but not answered; the restarted gateway wrote "
        f"{from_spool:.0f} rows from the spool in {drain_s:.1f} s ({served_stalled} served "
        f"while inserts were stalled)"
    )
    assert len(missing) <= bound
    # And they are the last answers: none from earlier in the run went missing.
    assert max(ages, default=0) < 1.0
    assert len(unanswered) <= CONCURRENCY  # at most one request in flight per client
    # Every row appended after the stall began was still in the spool at the kill:
    # the new process wrote them (all but the missing ones, never appended).
    assert from_spool >= served_stalled - len(missing) > 0
    assert await metric(second, "tollway_ledger_rows_dropped_total") == 0
