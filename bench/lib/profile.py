"""Where a process's CPU goes: py-spy recording and a summary of its collapsed stacks."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.lib import BenchError
from bench.lib.procs import Procs, pinned, run_quiet
from bench.lib.stack import Server
from bench.lib.wrk import Wrk, WrkStats

PYSPY_VENV = Path("/tmp/tollway-pyspy")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
ADDRESS = re.compile(r"^0x[0-9a-fA-F]+ ")
EVENT_LOOP_NOTE = (
    "note: without --profile-native, own time in `Runner.run (asyncio/runners.py)` is "
    "uvloop's C event loop (epoll, socket reads and writes, httptools parsing) with no "
    "Python frame above it; --profile-native splits it into C functions"
)

T = TypeVar("T")


def ensure_pyspy() -> str:
    """py-spy from PATH, else from (or installed into) its own venv under /tmp."""
    found = shutil.which("py-spy")
    if found:
        return found
    local = PYSPY_VENV / "bin" / "py-spy"
    if local.exists():
        return str(local)
    print(f"installing py-spy into {PYSPY_VENV} ...", flush=True)
    steps = [
        ["python3", "-m", "venv", str(PYSPY_VENV)],
        [str(PYSPY_VENV / "bin" / "pip"), "install", "-q", "py-spy"],
    ]
    for step in steps:
        done = run_quiet(step)
        if done.returncode != 0:
            raise BenchError(f"{shlex.join(step)} failed:\n{done.stderr[-2000:]}")
    return str(local)


def under_pyspy(
    procs: Procs,
    tmp: Path,
    pid: int,
    cpu: int,
    load: Callable[[], T],
    *,
    rate: int,
    native: bool,
) -> tuple[T, Path]:
    """Run ``load()`` while py-spy, on ``cpu``, samples ``pid``; its result and the raw stacks."""
    raw = tmp / "pyspy.raw"
    spy = procs.start(
        "py-spy",
        pinned(cpu, [
            ensure_pyspy(), "record", "--pid", str(pid), "--rate", str(rate),
            "--format", "raw", "--nolineno", "--output", str(raw),
            *(["--native"] if native else []),
        ]),
        tmp / "pyspy.log",
        new_session=False,
    )  # fmt: skip
    time.sleep(1.0)  # let py-spy attach before the load starts
    if spy.popen.poll() is not None:
        raise BenchError(f"py-spy exited early ({spy.popen.returncode}):\n{spy.log_tail()}")
    result = load()
    spy.popen.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        spy.popen.wait(30)
    finally:
        procs.stop(spy)
    if not raw.exists():
        raise BenchError(f"py-spy wrote no output:\n{spy.log_tail()}")
    return result, raw


def profile_gateway(
    args: argparse.Namespace, procs: Procs, tmp: Path, wrk: Wrk, gateway: Server, sim: Server,
    key: str, *, connections: int, duration: int,
) -> tuple[WrkStats, Path, str]:  # fmt: skip
    """One more wrk run against ``gateway`` while py-spy samples it (``--profile-*``
    options): wrk's figures, the raw stacks, and a first line saying what was profiled."""
    stats, raw = under_pyspy(
        procs, tmp, gateway.proc.pid, args.load_cpu,
        lambda: wrk.run(
            gateway.chat_url, key, connections, duration, logs=(gateway.proc, sim.proc)
        ),
        rate=args.profile_rate, native=args.profile_native,
    )  # fmt: skip
    title = (
        f"({connections} conns, {duration} s, under py-spy at {args.profile_rate} Hz"
        f"{', native' if args.profile_native else ''}, so slower than unprofiled): "
        f"{stats.rps:.0f} req/s, p50 {stats.p50_us} µs"
    )
    return stats, raw, title


def summarise_profile(raw: Path, top: int) -> str:
    """Top functions by own and cumulative samples from py-spy's raw (collapsed) output.

    Each raw line is ``root;...;leaf COUNT``. Own time counts the leaf frame;
    cumulative time counts every distinct frame on the stack once. Frames on
    every sample (the entry point down to the event loop) are left out of the
    cumulative table: they are 100% by construction.
    """
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [ADDRESS.sub("<native> ", f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
        by_package[_package(frames[-1])] += count
    if not total:
        return "py-spy recorded no samples (is ptrace allowed? try running as root)"
    trunk = sorted(f for f, c in cumulative.items() if c == total)
    for frame in trunk:
        del cumulative[frame]

    def table(title: str, counts: Counter[str]) -> list[str]:
        lines = [f"{title}:", f"  {'% samples':>9}  {'samples':>7}  function (file)"]
        for name, count in counts.most_common(top):
            lines.append(f"  {100 * count / total:8.1f}%  {count:7d}  {name}")
        return lines

    out = [
        f"py-spy: {total} samples of the gateway process (idle excluded; a thread that is "
        "runnable but preempted by another process still counts)"
    ]
    out += table(f"top {top} by own time (leaf frame)", own)
    out += table(f"top {top} by cumulative time (on the stack)", cumulative)
    out.append(f"  (left out, on every sample: {len(trunk)} frames from the entry point down)")
    out += table("own time by package", by_package)
    out.append(EVENT_LOOP_NOTE)
    return "\n".join(out)


def _package(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    if not path.endswith(".py") and "/" not in path and not path.startswith("<"):
        return f"native: {path}"  # --profile-native: a C source file or a shared library
    parts = [p for p in path.split("/") if p and p != "site-packages"]
    if not parts:
        return path
    head = parts[0]
    return head if len(parts) > 1 else head.removesuffix(".py")
