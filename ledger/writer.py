"""The ledger writer: settled requests' rows to the spool on disk, then to PostgreSQL.

Two steps, each its own task, so neither waits on the other:

- ``record_many`` (the recorder's consumer, on the event loop, never blocking)
  turns reports into rows and queues them; the *sync* task appends each
  batch to the spool and fsyncs it. What a SIGKILL can lose is what was not
  yet appended: at most the recorder's linger (``ledger.sync_interval_s``)
  plus one append.
- The *write* task reads the spool in order, ``batch_rows`` at a time, stores
  each batch in PostgreSQL (``ledger.store.insert``, which skips rows it
  already has) and only then moves the spool's cursor. While the database is
  down or slow it retries with a backoff; rows wait on disk, and are written
  in order, once, when it answers.

A full spool drops the newest rows: counted (``on_dropped``) and logged at
ERROR, never blocking a request. A row the database refuses as data (a value
out of range: a bug, not an outage) is set aside in ``rejected.jsonl`` in the
spool directory, counted and logged, so one bad row never stops the rest.

File work runs in one worker thread (the spool is not thread-safe; the loop
must not wait on fsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

import asyncpg
import msgspec
import orjson

from gateway.config import LedgerConfig
from ledger import schema, store
from ledger.database import UNREACHABLE, Conn, Pool
from ledger.rows import LedgerRow, decode, encode
from ledger.spool import Spool
from metering.report import RequestReport

log = logging.getLogger("tollway.ledger")

T = TypeVar("T")
Count = Callable[[int], None]

# SQLSTATE classes of a row the database will never take (22 data exception,
# 23 integrity): set aside. Any other error is the database's state: retried.
_BAD_DATA = ("22", "23")
_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
_LOUD_EVERY_S = 10.0  # a full spool is logged at most this often


def _ignore(count: int) -> None:
    pass


class LedgerWriter:
    def __init__(
        self,
        config: LedgerConfig,
        *,
        on_written: Count = _ignore,
        on_dropped: Count = _ignore,
        on_rejected: Count = _ignore,
    ) -> None:
        self.config = config
        self.spool = Spool(Path(config.spool_dir), max_bytes=config.spool_max_bytes)
        self.on_written = on_written
        self.on_dropped = on_dropped
        self.on_rejected = on_rejected
        self.written = 0  # rows the database acknowledged (stored or already there)
        self.dropped = 0
        self.rejected = 0
        self.failing = False  # the last write failed: the rows wait for the database
        self._pool: Pool | None = None
        self._queue: list[bytes] = []  # encoded rows not yet in the spool
        self._queued = asyncio.Event()
        self._appended = asyncio.Event()
        self._progress = asyncio.Event()  # the write task finished a batch (or failed one)
        self._hurry = asyncio.Event()  # stop() and flush(): no lingering for a batch
        self._files = ThreadPoolExecutor(1, thread_name_prefix="tollway-spool")
        self._tasks: list[asyncio.Task[None]] = []
        self._months: set[store.Month] = set()
        self._schema_ok = False
        self._closed = False
        self._last_loud = 0.0

    # -- the request path -----------------------------------------------------

    def record_many(self, reports: Sequence[RequestReport]) -> None:
        """Queue settled requests' rows for the spool. Never blocks, never raises."""
        if self._closed:
            self._drop(len(reports), "the gateway is stopping")
            return
        self._queue.extend(encode(LedgerRow.of(report)) for report in reports)
        self._queued.set()

    @property
    def waiting(self) -> int:
        """Rows not yet in the database: queued, and in the spool."""
        return len(self._queue) + self.spool.pending

    # -- lifecycle --------------------------------------------------------------

    async def start(self, pool: Pool | None, *, schema_checked: bool = False) -> None:
        """Open the spool (rows left by the last process are written first) and start.

        ``pool`` None: no database; rows are kept in the spool until one is configured.
        """
        await self._run_file(self.spool.open)
        if self.spool.pending:
            log.info("ledger: %d rows wait in the spool from before; writing them first",
                     self.spool.pending)  # fmt: skip
        self._pool = pool
        self._schema_ok = schema_checked
        self._tasks.append(asyncio.create_task(self._sync_loop(), name="tollway-ledger-sync"))
        if pool is not None:
            self._tasks.append(
                asyncio.create_task(self._write_loop(pool), name="tollway-ledger-write")
            )

    async def stop(self, grace_s: float = 5.0) -> None:
        """Put every queued row in the spool, write what the database takes within
        ``grace_s``, and stop; what is left stays in the spool for the next start."""
        self._closed = True
        self._hurry.set()
        await self.sync()
        deadline = time.monotonic() + grace_s
        while self.spool.pending and not self.failing and time.monotonic() < deadline:
            await self._progress_within(deadline)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._queue:  # a sync cut short by the cancellation
            await self._append(self._take())
        await self._run_file(self.spool.close)
        self._files.shutdown(wait=True)
        if self.spool.pending:
            log.warning(
                "ledger: %d rows stay in the spool %s; the next start writes them",
                self.spool.pending,
                self.config.spool_dir,
            )

    async def sync(self) -> None:
        """Append everything queued to the spool now."""
        while self._queue:
            await self._append(self._take())

    async def flush(self, within_s: float = 10.0) -> bool:
        """Wait until every row recorded so far is in the database; False if not in time."""
        deadline = time.monotonic() + within_s
        self._hurry.set()
        try:
            await self.sync()
            while self.spool.pending or self._queue:
                if time.monotonic() > deadline:
                    return False
                await self._progress_within(deadline)
            return True
        finally:
            if not self._closed:
                self._hurry.clear()

    async def _progress_within(self, deadline: float) -> None:
        """Wait for the write task's next batch (stored or failed), or the deadline."""
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._progress.wait()

    # -- spool --------------------------------------------------------------------

    def _take(self) -> list[bytes]:
        batch, self._queue = self._queue, []
        return batch

    async def _sync_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            await self.sync()

    async def _append(self, batch: list[bytes]) -> None:
        kept = await self._run_file(partial(self.spool.append, batch))
        if kept < len(batch):
            self._drop(len(batch) - kept, f"the spool is full ({self.config.spool_max_bytes} B)")
        if kept:
            self._appended.set()

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        self.on_dropped(count)
        now = time.monotonic()
        if now - self._last_loud >= _LOUD_EVERY_S:
            self._last_loud = now
            log.error(
                "ledger: DROPPED %d rows (%d in all): %s; %d rows wait for the database",
                count, self.dropped, why, self.spool.pending,
            )  # fmt: skip

    async def _run_file(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._files, call)

    # -- database -------------------------------------------------------------

    async def _write_loop(self, pool: Pool) -> None:
        failures = 0
        while True:
            if not self.spool.pending:
                self._appended.clear()
                await self._appended.wait()
            records, end = await self._run_file(partial(self.spool.read, self.config.batch_rows))
            if not records:
                continue
            try:
                await self._store(pool, records)
            except Exception as exc:  # whatever it is, the rows wait on disk
                if _cancelling():  # asyncpg may turn a cancellation into its own error
                    raise
                failures += 1
                self._note_failure(exc, failures)
                self._progress.set()
                await asyncio.sleep(_BACKOFF_S[min(failures, len(_BACKOFF_S)) - 1])
                continue
            if failures:
                log.warning("ledger: the database answers again; writing the rows that waited")
            failures = 0
            self.failing = False
            await self._run_file(partial(self.spool.ack, end, len(records)))
            self.written += len(records)
            self.on_written(len(records))
            self._progress.set()
            if len(records) < self.config.batch_rows:
                await self._linger()

    async def _linger(self) -> None:
        """Let a busy gateway gather the next batch: a round trip per write interval."""
        with contextlib.suppress(TimeoutError):  # not wait_for: it can swallow a cancel
            async with asyncio.timeout(self.config.write_interval_s):
                await self._hurry.wait()

    def _note_failure(self, exc: Exception, failures: int) -> None:
        self.failing = True
        if isinstance(exc, schema.SchemaError):
            log.error("ledger: %s; rows wait in the spool", exc)
        elif not isinstance(exc, (*UNREACHABLE, asyncpg.PostgresError)):
            if failures == 1 or failures % 50 == 0:
                log.error(
                    "ledger: writing a batch failed; the rows wait in the spool", exc_info=exc
                )
        elif failures == 1 or failures % 50 == 0:
            kind = "unreachable" if isinstance(exc, UNREACHABLE) else "failing"
            log.warning(
                "ledger: the database is %s (%s: %s); %d rows wait in the spool",
                kind, type(exc).__name__, exc, self.spool.pending,
            )  # fmt: skip
        if isinstance(exc, asyncpg.UndefinedTableError):  # a partition dropped under us
            self._months.clear()

    async def _store(self, pool: Pool, records: list[bytes]) -> None:
        rows, unreadable = _decode_all(records)
        if unreadable:
            self._reject(unreadable, "not a ledger row (unreadable spool record)")
        async with pool.acquire() as conn:
            if not self._schema_ok:
                await schema.check(conn)
                self._schema_ok = True
            for month in store.months(rows) - self._months:
                await store.ensure_partition(conn, month)
                self._months.add(month)
            try:
                await store.insert(conn, rows)
            except asyncpg.PostgresError as exc:
                if not (exc.sqlstate or "").startswith(_BAD_DATA):
                    raise
                await self._store_one_by_one(conn, rows)

    async def _store_one_by_one(self, conn: Conn, rows: list[LedgerRow]) -> None:
        """A batch the database refused as data: store each row alone, set aside the bad."""
        for row in rows:
            try:
                await store.insert(conn, [row])
            except asyncpg.PostgresError as exc:
                if not (exc.sqlstate or "").startswith(_BAD_DATA):
                    raise
                self._reject([orjson.dumps(msgspec.to_builtins(row))], str(exc))

    def _reject(self, payloads: list[bytes], why: str) -> None:
        self.rejected += len(payloads)
        self.on_rejected(len(payloads))
        path = Path(self.config.spool_dir) / "rejected.jsonl"
        stamp = datetime.now(UTC).isoformat()
        with open(path, "ab") as file:
            for payload in payloads:
                file.write(orjson.dumps({"at": stamp, "why": why, "row": payload.decode(
                    errors="replace")}) + b"\n")  # fmt: skip
        log.error("ledger: %d rows set aside in %s: %s", len(payloads), path, why)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _decode_all(records: list[bytes]) -> tuple[list[LedgerRow], list[bytes]]:
    rows: list[LedgerRow] = []
    bad: list[bytes] = []
    for record in records:
        try:
            rows.append(decode(record))
        except msgspec.DecodeError:
            bad.append(record)
    return rows, bad
