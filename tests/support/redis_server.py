"""A real ``redis-server`` for tests, on a free loopback port, killed at exit.

::

    with run_redis() as server:
        client = redis.Redis.from_url(server.url)
        server.stop()   # an outage: the port refuses connections
        server.start()  # the same server back on the same port (empty: nothing is saved)

``run_redis(cluster=True)`` starts three masters in cluster mode instead, the
16384 slots split between them; ``url`` names the first node (a cluster
client discovers the rest) and ``stop()``/``start()`` act on every node. Each
node keeps its ``nodes.conf`` in its own directory, so a restarted cluster
comes back with the same slots on the same ports.

Every process runs in its own session so that a test run interrupted at any
point still lets ``stop()`` take the whole process down.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"
SLOTS = 16384
CLUSTER_NODES = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """Distinct free ports; a cluster node also needs its bus port (port + 10000) free."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 < 65536 and port not in ports:
            ports.append(port)
    return ports


class _Node:
    """One redis-server process, restartable on the same port with the same directory."""

    def __init__(self, port: int, workdir: Path, *, cluster: bool) -> None:
        self.port = port
        self.workdir = workdir
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    def argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.log)]
        argv += ["--daemonize", "no", "--protected-mode", "no"]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            argv += ["--cluster-node-timeout", "2000"]
        return argv

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ping(timeout)

    def wait_ping(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on {self.port} exited with {self.proc.returncode}:\n"
                        + self.log_tail()
                    )
                try:
                    if client.ping():
                        return
                except redis.RedisError as exc:
                    last = exc
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise TimeoutError(f"redis-server on {self.port} did not answer PING: {last}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RedisServer:
    """A running redis-server (or a small cluster of them) owned by a test."""

    def __init__(self, nodes: list[_Node]) -> None:
        self._nodes = nodes

    @property
    def port(self) -> int:
        return self._nodes[0].port

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(node.port for node in self._nodes)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def cluster(self) -> bool:
        return self._nodes[0].cluster

    @property
    def running(self) -> bool:
        return all(node.proc is not None and node.proc.poll() is None for node in self._nodes)

    def stop(self) -> None:
        """Kill the server(s) at once, as a crash would: the port refuses connections."""
        for node in self._nodes:
            node.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Start the server(s) again on the same port(s); data is gone, cluster slots are not."""
        for node in self._nodes:
            node.start(timeout)
        if self.cluster:
            _wait_cluster_ok(self.ports, timeout)


def _wait_cluster_ok(ports: tuple[int, ...], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        states = []
        for port in ports:
            with redis.Redis(host=HOST, port=port, socket_timeout=1) as client:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text)
                state = text.splitlines()[0] if text else ""
        if all(states):
            return
        time.sleep(0.05)
    raise TimeoutError(f"the redis cluster on {ports} did not become ok: {state}")


def _form_cluster(ports: tuple[int, ...], timeout: float) -> None:
    """Split the slots between the nodes and introduce them to each other."""
    share = SLOTS // len(ports)
    for index, port in enumerate(ports):
        first = index * share
        last = SLOTS - 1 if index == len(ports) - 1 else first + share - 1
        with redis.Redis(host=HOST, port=port, socket_timeout=2) as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for other in ports:
                if other != port:
                    client.execute_command("CLUSTER", "MEET", HOST, other)
    _wait_cluster_ok(ports, timeout)


@contextlib.contextmanager
def run_redis(port: int | None = None, *, cluster: bool = False) -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 (three cluster masters with ``cluster=True``), killed at exit.

    ``port`` fixes the (first) port; by default a free one is chosen. Cluster
    nodes take ``port``, ``port + 1`` and ``port + 2`` when a port is given.
    """
    count = CLUSTER_NODES if cluster else 1
    ports = free_ports(count) if port is None else [port + i for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="tollway-redis-") as tmp:
        nodes = [_Node(p, Path(tmp) / str(p), cluster=cluster) for p in ports]
        server = RedisServer(nodes)
        try:
            for node in nodes:
                node.start()
            if cluster:
                _form_cluster(server.ports, timeout=20.0)
            yield server
        finally:
            server.stop()
