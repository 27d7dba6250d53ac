"""Shared code for the benchmark scripts under ``bench/``, one concept per module.

- ``procs``: starting, pinning and stopping child processes; signals; the guarded main.
- ``net``: free loopback ports, a small HTTP client, waiting for readiness.
- ``cpu``: CPU accounting from ``/proc`` (per process, per core) and the load average.
- ``wrk``: installing and running wrk with ``unique.lua``, parsing its ``TOLLWAY_BENCH`` line.
- ``measure``: one timed wrk run with the CPU figures taken around it.
- ``stack``: the simulator and gateways with a given config; readiness and sanity checks.
- ``redis_server``: a throwaway ``redis-server`` on loopback.
- ``report``: Markdown tables, machine facts, the git commit, a benchmark's ``RESULTS.md`` section.
- ``profile``: recording a process with py-spy and summarising where its CPU went.

The names below are shared by all of them.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"  # every process a benchmark starts listens here only


class BenchError(Exception):
    """The benchmark could not produce a trustworthy number."""
