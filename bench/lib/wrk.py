"""wrk, the load generator: installing it, running it with ``unique.lua``, reading its result.

``unique.lua`` gives every request a unique prompt (so no response cache can
answer it) and prints one ``TOLLWAY_BENCH {json}`` line from its ``done()``
hook with exact microsecond percentiles; with ``Wrk.same_body`` it sends one
fixed deterministic body instead (every request a cache hit). A run
with any error (non-2xx, socket error, timeout) raises: a benchmark of errors
is worthless. ``Wrk.run`` is one run start to end; ``Wrk.start`` and
``Wrk.collect`` split it, so several runs can load several targets at once
(from this one thread: no threads, since children are started with a
``preexec_fn``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lib import BenchError
from bench.lib.procs import Proc, die_with_parent, pinned

LUA = Path(__file__).resolve().parent / "unique.lua"
PREFIX = "TOLLWAY_BENCH "
ERROR_KEYS = ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")


def ensure_wrk() -> str:
    """wrk's path; installs it with apt-get when missing (as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("wrk is not installed and this is not root: apt-get install wrk")
    print("installing wrk with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"apt-get install wrk failed:\n{done.stderr[-2000:]}")
    found = shutil.which("wrk")
    if not found:
        raise BenchError("wrk still not on PATH after apt-get install wrk")
    return found


@dataclass(frozen=True)
class WrkStats:
    """What ``unique.lua``'s ``done()`` reported for one run."""

    requests: int
    sent: int
    duration_us: int
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    mean_us: float
    max_us: int

    @property
    def duration_s(self) -> float:
        return self.duration_us / 1e6

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @classmethod
    def parse(cls, stats: dict[str, Any]) -> WrkStats:
        return cls(
            requests=int(stats["requests"]),
            sent=int(stats["sent"]),
            duration_us=int(stats["duration_us"]),
            p50_us=int(stats["p50_us"]),
            p90_us=int(stats["p90_us"]),
            p99_us=int(stats["p99_us"]),
            p999_us=int(stats["p999_us"]),
            mean_us=float(stats["mean_us"]),
            max_us=int(stats["max_us"]),
        )


@dataclass(frozen=True)
class WrkRun:
    """A running wrk, from ``Wrk.start``: its stdout and stderr are pipes read at the end."""

    url: str
    argv: list[str]
    popen: subprocess.Popen[str]
    deadline: float  # time.monotonic() by which it must have finished

    def wait(self) -> tuple[str, str]:
        """wrk's (stdout, stderr) once it exits; killed and raised if it outlives the deadline."""
        try:
            stdout, stderr = self.popen.communicate(
                timeout=max(0.0, self.deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired as exc:
            self.stop()
            raise BenchError(f"wrk did not finish: {shlex.join(self.argv)}") from exc
        except BaseException:  # Ctrl-C, SIGTERM: leave no wrk behind, as subprocess.run does
            self.stop()
            raise
        return stdout, stderr

    def stop(self) -> None:
        """Kill it if it still runs (a run abandoned because another one failed); close pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


@dataclass(frozen=True)
class Wrk:
    """``wrk -t1`` pinned to ``cpu``, posting chat completions for ``model``."""

    path: str
    cpu: int
    model: str
    max_tokens: int
    same_body: bool = False  # one deterministic body for every request (cache hits)

    def argv(
        self, url: str, key: str, connections: int, duration: float, stream: bool
    ) -> list[str]:
        nonce = secrets.token_hex(6)  # fresh per run: prompts never repeat across runs
        return pinned(
            self.cpu,
            [
                self.path, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
                "--latency", "--timeout", "10s", "-s", str(LUA), url,
                "--", self.model, key, nonce, "1" if stream else "0", str(self.max_tokens),
                "same" if self.same_body else "unique",
            ],
        )  # fmt: skip

    def run(
        self,
        url: str,
        key: str,
        connections: int,
        duration: float,
        *,
        stream: bool = False,
        logs: Sequence[Proc] = (),
    ) -> WrkStats:
        """One run; raises with wrk's output and the tails of ``logs`` on any error."""
        return self.collect(self.start(url, key, connections, duration, stream=stream), logs=logs)

    def start(
        self, url: str, key: str, connections: int, duration: float, *, stream: bool = False
    ) -> WrkRun:
        """Start one run and return at once; ``collect`` waits for it and reads its result."""
        argv = self.argv(url, key, connections, duration, stream)
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,  # safe: this process runs no threads
        )
        return WrkRun(url, argv, popen, time.monotonic() + duration + 60)

    def collect(self, run: WrkRun, *, logs: Sequence[Proc] = ()) -> WrkStats:
        """Wait for a started run; raises with wrk's output and the tails of ``logs`` on errors."""
        stdout, stderr = run.wait()
        if run.popen.returncode != 0:
            raise BenchError(f"wrk failed ({run.popen.returncode}):\n{stdout}\n{stderr}")
        return parse_output(run.url, stdout, logs)


def parse_output(url: str, stdout: str, logs: Sequence[Proc]) -> WrkStats:
    """The stats of a run that exited 0; raises on any error it reports (see the module doc)."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(PREFIX)), None)
    if line is None:
        raise BenchError(f"no TOLLWAY_BENCH line from wrk's done() hook:\n{stdout}")
    stats: dict[str, Any] = json.loads(line.removeprefix(PREFIX))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", stdout)
    socket_errors = re.search(r"Socket errors:.*", stdout)
    failed = {k: stats[k] for k in ERROR_KEYS if stats[k]}
    if non2xx or failed or socket_errors:
        tails = "".join(f"\n{proc.name} log:\n{proc.log_tail()}" for proc in logs)
        raise BenchError(
            f"{url}: errors during the run {failed or ''}"
            f"{' / ' + non2xx.group(0) if non2xx else ''}"
            f"{' / ' + socket_errors.group(0) if socket_errors else ''}; "
            "the numbers would be meaningless.\n"
            f"wrk output:\n{stdout}{tails}"
        )
    if stats["sent"] < stats["requests"]:
        raise BenchError(f"{url}: fewer prompts built than responses counted: {stats}")
    if stats["requests"] == 0:
        raise BenchError(f"{url}: wrk completed no requests:\n{stdout}")
    return WrkStats.parse(stats)
