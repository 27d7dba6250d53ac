"""bench/lib/wrk's start / collect split, with a stand-in for wrk (no network, no wrk needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.lib import BenchError
from bench.lib.measure import Target, load_together
from bench.lib.procs import Proc
from bench.lib.wrk import PREFIX, Wrk

STATS = {
    "requests": 100, "sent": 100, "duration_us": 1_000_000, "p50_us": 900, "p90_us": 1000,
    "p99_us": 1200, "p999_us": 1500, "mean_us": 950.0, "max_us": 2000, "status_errors": 0,
    "connect_errors": 0, "read_errors": 0, "write_errors": 0, "timeouts": 0,
}  # fmt: skip


def fake_wrk(tmp_path: Path, body: str) -> Wrk:
    """A Wrk whose executable is a shell script; the real wrk's arguments are ignored."""
    script = tmp_path / "wrk"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return Wrk(str(script), min(os.sched_getaffinity(0)), "model", 16)


def ok_body(requests: int = 100) -> str:
    return f"echo '{PREFIX}{json.dumps({**STATS, 'requests': requests, 'sent': requests})}'"


def test_run_is_collect_of_start(tmp_path: Path) -> None:
    wrk = fake_wrk(tmp_path, ok_body())
    assert wrk.run("http://x/", "key", 1, 1).requests == 100
    handle = wrk.start("http://x/", "key", 1, 1)
    assert wrk.collect(handle).rps == pytest.approx(100.0)


def test_collect_raises_on_a_failed_run(tmp_path: Path) -> None:
    wrk = fake_wrk(tmp_path, "echo boom >&2; exit 3")
    with pytest.raises(BenchError, match=r"wrk failed \(3\)"):
        wrk.run("http://x/", "key", 1, 1)


def test_load_together_stops_the_other_runs_when_one_fails(tmp_path: Path) -> None:
    # For key "bad" the script fails after a moment; otherwise it notes its pid and sleeps.
    pidfile = tmp_path / "pid"
    wrk = fake_wrk(
        tmp_path,
        f'for a; do [ "$a" = bad ] && sleep 0.5 && exit 1; done; echo $$ > {pidfile}; '
        "exec sleep 30",
    )
    gateway = Proc("gateway", None, None)  # type: ignore[arg-type]  # only its name is read
    targets = [Target("http://x/", "bad", gateway), Target("http://y/", "good", gateway)]
    with pytest.raises(BenchError, match="wrk failed"):
        load_together(wrk, targets, 1, 1, upstream=gateway)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left sleeping
        os.kill(int(pidfile.read_text()), 0)
