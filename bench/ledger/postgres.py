"""The ledger benchmark's PostgreSQL: the test suite's throwaway server, pinned, with fsync on,
and what it costs: the CPU time of the postmaster and every process it started.

The server is ``tests/support/postgres_server.py``'s (PostgreSQL 15 on
127.0.0.1, run as the ``postgres`` user when this is root), with ``fsync=on``,
the ledger's real setting (the tests turn it off). It is pinned by starting
it from a thread pinned to the load core: the postmaster inherits the
affinity and every process it forks (backends, WAL writer, checkpointer,
autovacuum) inherits it from the postmaster.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from bench.lib import BenchError
from bench.lib.cpu import CLK_TCK
from bench.lib.procs import run_quiet
from tests.support.postgres_server import PG_BIN, PostgresServer, installed, run_postgres


@contextlib.contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """Run this thread (and what it starts: threads, processes) on ``cpu`` only, then restore."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def pinned_postgres(cpu: int) -> Iterator[PostgresServer]:
    """A fresh PostgreSQL with fsync on, every process of it on ``cpu``; gone at exit."""
    if not installed():
        raise BenchError(f"PostgreSQL 15 is not installed in {PG_BIN}: apt-get install postgresql")
    with contextlib.ExitStack() as stack:
        with on_cpu(cpu):
            server = stack.enter_context(run_postgres(fsync=True))
        pid = postmaster_pid(server)
        if os.sched_getaffinity(pid) != {cpu}:
            raise BenchError(f"postgres (pid {pid}) runs on {os.sched_getaffinity(pid)}, not {cpu}")
        yield server


def postmaster_pid(server: PostgresServer) -> int:
    """The postmaster's pid: the first line of ``postmaster.pid`` in the data directory."""
    return int((server.datadir / "postmaster.pid").read_text().split("\n", 1)[0])


def _own_and_reaped(pid: int) -> tuple[float, int]:
    """(utime + stime + cutime + cstime in seconds, parent pid) of one process.

    The children's part counts the processes it started that have exited and
    been waited for (short-lived backends, autovacuum workers)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK, int(fields[1])


def tree_cpu_seconds(root: int) -> float:
    """CPU time of ``root`` and its live children, plus their exited children's."""
    total, _ = _own_and_reaped(root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == root:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone while we read
            cpu, parent = _own_and_reaped(int(entry.name))
            if parent == root:
                total += cpu
    return total


def postgres_version() -> str:
    """``PostgreSQL X.Y``, for the machine line."""
    out = run_quiet([str(PG_BIN / "postgres"), "--version"]).stdout  # postgres (PostgreSQL) X.Y
    found = re.search(r"\(PostgreSQL\) (\S+)", out)
    return f"PostgreSQL {found[1] if found else 'unknown'}"


def ledger_counts(server: PostgresServer) -> tuple[int, int]:
    """(rows in ``usage_requests``, requests summed in ``usage_hourly``): equal when every
    stored row was summed once."""
    out = server.psql(
        "SELECT (SELECT count(*) FROM usage_requests), "
        "(SELECT coalesce(sum(requests), 0) FROM usage_hourly)"
    )
    rows, summed = out.split("|")
    return int(rows), int(summed)
