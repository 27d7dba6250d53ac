"""The HTTP edge against slow and vanishing clients, on a real gateway process.

- a client that announces a body, sends part of it and hangs up: a 499, no
  traceback in the log, never counted as a 500;
- a client that dribbles its body: 408 and the connection closed once
  ``limits.body_read_timeout_s`` has passed;
- a client that dribbles its request head: uvicorn has no head timeout, so the
  shipped proxy config (``deploy/compose/nginx.conf``, run here by a real
  nginx in front of the gateway) closes it after its ``client_header_timeout``.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST_SIM, KEY, gateway_config
from tests.support.metrics import scrape, value
from tests.support.procs import Proc, free_port, start_gateway, start_sim, wait_http_ok
from tests.support.tools import needs

BODY_TIMEOUT_S = 1.0
SHIPPED_NGINX = Path(__file__).parents[2] / "deploy" / "compose" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@pytest.fixture(scope="module")
def edge_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    log_dir: Path = tmp_path_factory.mktemp("edge")
    procs: list[Proc] = []
    try:
        sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
        procs += sims
        config = gateway_config([sims[0].url], [sims[1].url])
        config["limits"] = {"max_body_bytes": 64 * 1024, "body_read_timeout_s": BODY_TIMEOUT_S}
        gateway = start_gateway(log_dir, config)
        procs.append(gateway)
        yield gateway
    finally:
        for proc in reversed(procs):
            proc.stop()


def _connect(gateway: Proc) -> socket.socket:
    host, port = gateway.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _head(length: int) -> bytes:
    return (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        "Host: gateway\r\n"
        f"Authorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _read_all(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds from now)."""
    started = time.monotonic()
    sock.settimeout(within_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def _requests(gateway: Proc, status: str) -> float:
    return value(scrape(gateway.url), "tollway_requests_total", status=status)


def test_a_client_gone_mid_body_is_a_499_without_a_traceback(edge_gateway: Proc) -> None:
    before_499, before_500 = _requests(edge_gateway, "499"), _requests(edge_gateway, "500")
    body = b'{"model": "sim-small", "messages": [{"role": "user", "content": "hello"}]}'
    with _connect(edge_gateway) as sock:
        sock.sendall(_head(len(body) + 1000) + body)  # 1,000 bytes short
        time.sleep(0.2)  # the gateway is reading the body
    deadline = time.monotonic() + 5
    while _requests(edge_gateway, "499") == before_499 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _requests(edge_gateway, "499") == before_499 + 1
    assert _requests(edge_gateway, "500") == before_500
    log = edge_gateway.log.read_text(errors="replace")
    assert "Traceback" not in log
    assert " ERROR " not in log


def test_a_dribbled_body_gets_408_and_the_connection_closed(edge_gateway: Proc) -> None:
    body = b'{"model": "sim-small", "messages": [{"role": "user", "content": "slow"}]}'
    with _connect(edge_gateway) as sock:
        sock.sendall(_head(len(body)) + body[:5])
        started = time.monotonic()
        for byte in body[5:15]:  # one byte every 0.3 s: never done within the timeout
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # closed on us: what is asserted below
            time.sleep(0.3)
        data, _ = _read_all(sock, within_s=10)
        closed_after = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b"request_timeout" in data
    assert BODY_TIMEOUT_S * 0.9 <= closed_after < BODY_TIMEOUT_S + 3


@pytest.fixture(scope="module")
def shipped_proxy(edge_gateway: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real nginx running the shipped config, in front of the gateway: its address."""
    assert NGINX is not None
    work = tmp_path_factory.mktemp("nginx")
    port = free_port()
    gateway = edge_gateway.url.removeprefix("http://")
    conf = SHIPPED_NGINX.read_text()
    conf = conf.replace("server gateway:8080", f"server {gateway}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    assert gateway in conf
    assert f"127.0.0.1:{port}" in conf
    (work / "nginx.conf").write_text(conf)
    directives = f"daemon off; pid {work}/nginx.pid; error_log {work}/error.log;"
    log = (work / "nginx.out").open("wb")
    proc = subprocess.Popen(
        [NGINX, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", directives],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", proc, timeout=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _shipped_header_timeout_s() -> float:
    found = re.search(r"client_header_timeout\s+(\d+)s;", SHIPPED_NGINX.read_text())
    assert found, "the shipped nginx config sets no client_header_timeout"
    return float(found.group(1))


@needs(NGINX is not None, "nginx (apt install nginx)")
def test_a_dribbled_head_is_closed_by_the_shipped_proxy(shipped_proxy: str) -> None:
    timeout_s = _shipped_header_timeout_s()
    assert timeout_s <= 10  # "a few seconds"
    host, port = shipped_proxy.removeprefix("http://").split(":")
    head = _head(2)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.monotonic()
        closed = False
        for byte in head:  # one byte every 0.5 s: the head would take over a minute
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            sock.settimeout(0.5)
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed, "the proxy kept a dribbling client's connection open"
    assert timeout_s * 0.9 <= elapsed < timeout_s + 3


def test_a_whole_request_passes_the_shipped_proxy(shipped_proxy: str) -> None:
    """The proxy's timeouts leave an ordinary request alone."""
    body = (
        b'{"model": "sim-small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}'
    )
    host, port = shipped_proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_head(len(body)) + body)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"x-tollway-cost-usd" in reply.lower()
