"""A throwaway ``redis-server`` on loopback: no persistence, its own directory, a free port."""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from bench.lib import HOST, BenchError
from bench.lib.net import free_port
from bench.lib.procs import Proc, Procs, check_pinned, pinned, run_quiet


@dataclass(frozen=True)
class RedisServer:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


def ping(port: int, timeout: float = 1.0) -> bool:
    """One ``PING`` over a raw socket: True on ``+PONG``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(procs: Procs, tmp: Path, cpu: int, timeout: float = 10.0) -> RedisServer:
    """``redis-server`` on ``cpu`` (``--save "" --appendonly no``); returns once it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed: apt-get install redis-server")
    workdir = tmp / "redis"
    workdir.mkdir()
    port = free_port()
    proc = procs.start(
        "redis",
        pinned(cpu, [
            binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--protected-mode", "no", "--daemonize", "no",
        ]),
        tmp / "redis.log",
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ping(port):
        if proc.popen.poll() is not None:
            raise BenchError(
                f"redis-server exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server on {port} did not answer PING:\n{proc.log_tail()}")
        time.sleep(0.05)
    check_pinned(proc, cpu)
    return RedisServer(proc, port)


def redis_version() -> str:
    """``redis-server X.Y.Z``, for the machine line of a benchmark that uses Redis."""
    words = run_quiet(["redis-server", "--version"]).stdout.split()
    version = next((w.removeprefix("v=") for w in words if w.startswith("v=")), "unknown")
    return f"redis-server {version}"
