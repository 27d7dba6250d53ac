"""Real processes for tests: the simulator and the gateway, each on a free loopback port.

Each runs as a subprocess in its own process group (the real CLI, as a user
would start it) and is killed with its whole group at teardown, so nothing
outlives the test session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def wait_http_ok(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s (last error: {last})")


def spawn(
    name: str,
    argv: Sequence[str],
    ready_url: str,
    log: Path,
    *,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("wb")
    popen = subprocess.Popen(
        list(argv),
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )
    handle.close()
    proc = Proc(name, ready_url.rsplit("/", 1)[0], popen, log)
    try:
        wait_http_ok(ready_url, popen, timeout)
    except Exception as exc:
        proc.stop(signal.SIGKILL)
        raise RuntimeError(f"{name} did not start: {exc}\n{proc.log_tail()}") from exc
    return proc


def start_sim(log_dir: Path, models: Sequence[str], *extra: str, port: int | None = None) -> Proc:
    port = port or free_port()
    argv = [str(BIN / "tollway"), "sim", "--host", "127.0.0.1", "--port", str(port)]
    for model in models:
        argv += ["--model", model]
    argv += list(extra)
    return spawn(
        f"sim:{port}", argv, f"http://127.0.0.1:{port}/health", log_dir / f"sim-{port}.log"
    )


def start_gateway(
    log_dir: Path,
    config: dict[str, Any],
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    port = port or free_port()
    path = log_dir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [str(BIN / "tollway"), "serve", "--config", str(path), "--port", str(port)]
    argv += ["--log-level", "warning"]
    return spawn(
        f"gateway:{port}",
        argv,
        f"http://127.0.0.1:{port}/health",
        log_dir / f"gateway-{port}.log",
        env=env,
    )


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()
