"""Child processes of a benchmark: started pinned or not, logged, and always stopped.

Every child gets ``PR_SET_PDEATHSIG``, so it receives SIGTERM from the kernel
even if the runner dies by SIGKILL. ``guarded`` is the benchmarks' main: it
turns SIGTERM and SIGHUP into ``SystemExit`` and stops every child on success,
failure (a ``BenchError``, whose logs are kept) and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from bench.lib import REPO, BenchError


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the runner dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; kept across exec


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run on one cpu only."""
    return ["taskset", "-c", str(cpu), *argv]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text)


@dataclass
class Procs:
    """Every process the benchmark starts; ``stop_all`` leaves none behind."""

    items: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path | None,
        *,
        new_session: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = log.open("wb")
        try:
            popen = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
                preexec_fn=die_with_parent,  # safe: this process runs no threads
            )
        finally:
            if not isinstance(out, int):
                out.close()
        proc = Proc(name, popen, log)
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.terminate()
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        # Newest first: wrk/py-spy, then the gateways, then what they call.
        for proc in reversed(list(self.items)):
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"warning: could not stop {proc.name} (pid {proc.pid}): {exc}")


def check_pinned(proc: Proc, cpu: int) -> None:
    affinity = os.sched_getaffinity(proc.pid)
    if affinity != {cpu}:
        raise BenchError(f"{proc.name} (pid {proc.pid}) runs on cpus {affinity}, not {{{cpu}}}")


def check_alive(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")


def run_quiet(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    print(f"\n{signal.Signals(signum).name}; stopping everything this benchmark started")
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C does, so ``finally`` blocks stop the children."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


def guarded(name: str, body: Callable[[Procs, Path], None]) -> int:
    """Run ``body(procs, tmp)``; stop every process it started, whatever happens.

    Returns the exit status: 0, 1 on a ``BenchError`` (the temporary directory
    with the logs is kept and named), 130 on Ctrl-C.
    """
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix=f"tollway-{name}-"))
    keep_tmp = False
    try:
        body(procs, tmp)
    except BenchError as exc:
        keep_tmp = True
        print(f"\nbench/{name} FAILED: {exc}\n(logs kept in {tmp})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything this benchmark started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
