"""How many rows per second one gateway's batch writer stores in PostgreSQL.

Runs in this process, on an event loop like the gateway's (uvloop), with the
gateway's own code: a ``LedgerWriter`` (its spool on local disk, fsync'd) and
an asyncpg pool from ``ledger.database.open_pool``.

- **End to end**: synthetic reports (``bench.ledger.synthetic``) are handed to
  ``record_many`` in recorder-sized batches as fast as the loop goes (each
  batch a turn of the loop, so the writer's tasks run alongside), then
  ``flush`` waits until every row is in PostgreSQL. Timed from the first
  ``record_many`` to ``flush`` returning.
- **The insert alone**: ``ledger.store.insert`` (one statement: the rows and
  their hourly sums) on one connection, batch after batch of fresh rows, at
  each batch size: what the database and asyncpg take without the spool.

Each figure carries this process's CPU time (the gateway's side: encoding,
the spool, building the statement's arrays, asyncpg) and PostgreSQL's (every
process of the server) over the same window.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.ledger.postgres import tree_cpu_seconds
from bench.ledger.summary import WriterRun
from bench.ledger.synthetic import reports
from bench.lib import BenchError
from bench.lib.cpu import cpu_seconds
from gateway.config import DatabaseConfig, LedgerConfig
from ledger import schema, store
from ledger.database import Pool, open_pool
from ledger.rows import LedgerRow
from ledger.writer import LedgerWriter
from metering.report import RequestReport


@dataclass(frozen=True)
class WriterPlan:
    rows: int  # end to end
    record_batch: int  # reports per record_many, as the recorder hands them on
    batch_rows: int  # the writer's batch_rows
    insert_rows: int  # per insert batch size
    insert_batches: tuple[int, ...]


def measure_writer(
    url: str, spool_dir: Path, postgres_pid: int, plan: WriterPlan
) -> list[WriterRun]:
    """The end-to-end run, then the insert alone at each batch size, into the same tables."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_measure(url, spool_dir, postgres_pid, plan))


async def _measure(url: str, spool_dir: Path, pg: int, plan: WriterPlan) -> list[WriterRun]:
    pool = await open_pool(DatabaseConfig(url=url))
    try:
        async with pool.acquire() as conn:
            await schema.migrate(conn)
        print(f"  building {plan.rows:,} synthetic reports ...", flush=True)
        settled = reports(plan.rows)
        config = LedgerConfig(spool_dir=str(spool_dir), batch_rows=plan.batch_rows)
        runs = [await end_to_end(pool, config, settled, plan.record_batch, pg)]
        del settled
        print(f"  {runs[-1].progress()}", flush=True)
        for size in plan.insert_batches:
            count = max(size, plan.insert_rows // size * size)
            rows = [LedgerRow.of(r) for r in reports(count, seed=size)]
            runs.append(await insert_alone(pool, rows, size, pg))
            print(f"  {runs[-1].progress()}", flush=True)
        return runs
    finally:
        await pool.close()


async def end_to_end(
    pool: Pool, config: LedgerConfig, settled: Sequence[RequestReport], record_batch: int, pg: int
) -> WriterRun:
    """``record_many`` every report, then ``flush``: the writer's rows per second."""
    writer = LedgerWriter(config)
    await writer.start(pool, schema_checked=True)
    try:
        me, db = cpu_seconds(os.getpid()), tree_cpu_seconds(pg)
        started = time.perf_counter()
        for i in range(0, len(settled), record_batch):
            writer.record_many(settled[i : i + record_batch])
            await asyncio.sleep(0)  # the loop's next turn: the spool and write tasks run
        recorded = time.perf_counter()
        if not await writer.flush(within_s=max(60.0, len(settled) / 1000)):
            raise BenchError(f"the writer did not store {len(settled):,} rows in time")
        seconds = time.perf_counter() - started
        me, db = cpu_seconds(os.getpid()) - me, tree_cpu_seconds(pg) - db
    finally:
        await writer.stop()
    if writer.written != len(settled) or writer.dropped or writer.rejected:
        raise BenchError(
            f"the writer stored {writer.written:,} of {len(settled):,} rows "
            f"({writer.dropped} dropped, {writer.rejected} rejected)"
        )
    return WriterRun(
        label=f"end to end: record_many ({record_batch} a call) to flush, "
        f"batch_rows {config.batch_rows}",
        rows=len(settled),
        seconds=seconds,
        client_cpu_s=me,
        db_cpu_s=db,
        statements=None,
        statement_ms=None,
        record_s=recorded - started,
    )


async def insert_alone(pool: Pool, rows: Sequence[LedgerRow], size: int, pg: int) -> WriterRun:
    """``store.insert`` of ``size`` fresh rows at a time, one statement after another."""
    times: list[float] = []
    async with pool.acquire() as conn:
        for month in store.months(rows):
            await store.ensure_partition(conn, month)
        me, db = cpu_seconds(os.getpid()), tree_cpu_seconds(pg)
        started = time.perf_counter()
        for i in range(0, len(rows), size):
            began = time.perf_counter()
            stored = await store.insert(conn, rows[i : i + size])
            times.append(time.perf_counter() - began)
            if stored != len(rows[i : i + size]):
                raise BenchError(f"insert stored {stored} of {size} fresh rows")
        seconds = time.perf_counter() - started
        me, db = cpu_seconds(os.getpid()) - me, tree_cpu_seconds(pg) - db
    times.sort()
    return WriterRun(
        label=f"insert statement alone, {size:,} rows",
        rows=len(rows),
        seconds=seconds,
        client_cpu_s=me,
        db_cpu_s=db,
        statements=len(times),
        statement_ms=1000 * times[len(times) // 2],
        record_s=None,
    )
