"""A real throwaway PostgreSQL 15 for tests, on a free loopback port, gone at exit.

::

    with run_postgres() as server:
        pool = await asyncpg.create_pool(server.url)  # postgresql://tollway@127.0.0.1:PORT/tollway
        server.kill()    # a crash: SIGKILL the postmaster and its backends
        server.start()   # back on the same port and data dir, after crash recovery
        server.psql("SELECT count(*) FROM ledger_rows")  # '42'
        server.reset()   # an empty database tollway again

The cluster is made by ``initdb`` in a fresh temporary directory (trust
authentication, superuser ``tollway``, database ``tollway``) and served by
one ``postgres`` process listening on 127.0.0.1 only, with its unix socket in
the data directory and ``fsync=off`` (a test's data need not survive the
machine, only the process: a SIGKILLed server recovers from its WAL).

PostgreSQL refuses to run as root, so as root every server process runs as
the ``postgres`` OS user (the Debian package creates it) in a directory it
owns; as any other user it runs as that user. The postmaster runs in its own
session, so a Ctrl-C in the terminal does not reach it, and ``kill()``
takes its backends down with it; an ``atexit`` hook kills whatever a test left
running. (No parent-death signal: it fires when the *thread* that started the
server exits, and a test restarting the server from ``asyncio.to_thread``
would see it die. A SIGKILLed pytest leaves its servers running: their pids
are the first line of ``/tmp/tollway-pg-*/data/postmaster.pid``.)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PG_BIN = Path(os.environ.get("TOLLWAY_PG_BIN", "/usr/lib/postgresql/15/bin"))
HOST = "127.0.0.1"
USER = "tollway"
DATABASE = "tollway"
OS_USER = "postgres"  # who runs the server when we are root


def installed() -> bool:
    """Whether the PostgreSQL server binaries are here (Debian package ``postgresql``)."""
    return all((PG_BIN / name).is_file() for name in ("initdb", "postgres", "pg_isready", "psql"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to the ``postgres`` user; nothing when not root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(OS_USER)
    env = {**os.environ, "HOME": entry.pw_dir, "USER": OS_USER, "LOGNAME": OS_USER}
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "env": env}


def _chown_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, or None once it is gone."""
    try:
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                kids.append(int(entry.name))
    return kids


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Until none of ``pids`` runs (zombies count as gone: they hold no shared memory,
    and a container's PID 1 may never reap them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((stat := _stat(pid)) is None or stat[0] == "Z" for pid in pids):
            return
        time.sleep(0.01)


class PostgresServer:
    """One PostgreSQL cluster owned by a test: its data dir, port and postmaster."""

    def __init__(self, workdir: Path, port: int, *, fsync: bool = False) -> None:
        self.workdir = workdir
        self.port = port
        self.datadir = workdir / "data"
        self.log = workdir / "postgres.log"
        self.fsync = fsync
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def initdb(self) -> None:
        """Make the cluster: trust auth, superuser ``tollway``, UTF-8, C collation."""
        argv = [str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", USER, "-A", "trust"]
        argv += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, **_run_as())
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stderr}")

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster (again) on the same port and data dir and wait until it
        accepts connections; after a ``kill()`` this includes crash recovery."""
        if self.running:
            return
        argv = [str(PG_BIN / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]
        argv += ["-k", str(self.datadir), "-c", f"listen_addresses={HOST}"]
        argv += ["-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "logging_collector=off"]
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **_run_as(),
            )
        atexit.register(self.kill)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        argv = [str(PG_BIN / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port)]
        argv += ["-U", USER, "-d", "postgres", "-t", "1"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                self._proc = None
                raise RuntimeError(f"postgres on {self.port} exited ({code}):\n{self.log_tail()}")
            if subprocess.run(argv, check=False).returncode == 0:
                return
            time.sleep(0.05)
        self.kill()
        tail = self.log_tail()
        raise TimeoutError(f"postgres on {self.port} did not accept connections:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, a checkpoint is written."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._forget()

    def kill(self) -> None:
        """A crash: SIGKILL the postmaster and every backend and helper it started, and
        wait until they are gone. (Each child runs in its own session, so they are found
        by parent pid; the postmaster is stopped first so that it forks no more.)"""
        proc = self._proc
        if proc is None:
            return
        kids: list[int] = []
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            kids = _children(proc.pid)
            for pid in [proc.pid, *kids]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        _wait_gone(kids)
        self._forget()

    def _forget(self) -> None:
        self._proc = None
        atexit.unregister(self.kill)

    def psql(self, sql: str, *, database: str = DATABASE) -> str:
        """Run SQL (several statements allowed) as ``tollway``; psql's unaligned, tuples-only
        output (``|`` between columns), stripped. Raises ``RuntimeError`` on any error."""
        argv = [str(PG_BIN / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", HOST]
        argv += ["-p", str(self.port), "-U", USER, "-d", database, "-f", "-"]
        env = {**os.environ, "PGCONNECT_TIMEOUT": "5"}
        result = subprocess.run(
            argv, input=sql, capture_output=True, text=True, check=False, env=env, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def reset(self) -> None:
        """Drop database ``tollway`` (closing its connections) and create it empty."""
        self.psql(
            f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE);\nCREATE DATABASE {DATABASE};",
            database="postgres",
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def run_postgres(port: int | None = None, *, fsync: bool = False) -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster on 127.0.0.1 with an empty database ``tollway``; stopped
    and its directory removed at exit. ``port`` fixes the port (default: a free one)."""
    if not installed():
        raise RuntimeError(f"PostgreSQL is not installed in {PG_BIN} (Debian package postgresql)")
    workdir = Path(tempfile.mkdtemp(prefix="tollway-pg-"))
    try:
        _chown_to_server_user(workdir)
        server = PostgresServer(workdir, port or free_port(), fsync=fsync)
        server.initdb()
        try:
            server.start()
            server.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
