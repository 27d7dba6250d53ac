"""Loopback networking for benchmarks: free ports, one-shot HTTP calls, readiness."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from bench.lib import HOST, BenchError
from bench.lib.procs import Proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str,
    url: str,
    body: dict[str, Any] | bytes | None = None,
    *,
    key: str | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body); an HTTP error status is returned, not raised.
    ``body``: a JSON object, or its bytes already encoded."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def wait_ready(proc: Proc, url: str, timeout: float = 60.0, *, expect: int = 200) -> None:
    """Until ``GET url`` answers ``expect``; fails early, with the log, if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} before {url} answered:\n"
                + proc.log_tail()
            )
        try:
            status, _, _ = http("GET", url, timeout=1.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == expect:
                return
            last = f"HTTP {status}"
        time.sleep(0.1)
    raise BenchError(f"{proc.name}: {url} not ready after {timeout:.0f} s ({last})")
