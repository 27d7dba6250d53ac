"""One timed wrk run with the CPU figures taken around it.

The gateway's and the upstream's CPU time (utime + stime, all threads) and
each core's busy share are read before the run and after it. ``settle_s``
keeps the processes' window open after wrk stops, so work a request leaves
behind (batched span export, ledger writes) is charged to the run that caused
it; the busy shares (the cores', the gateway's) cover wrk's run only.

``measure_together`` loads several gateways at the same time, one wrk each,
and takes the same figures for each: a noisy host then disturbs all of them
alike at every instant, so ratios between them are steadier than between
runs taken one after another.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.lib.cpu import busy_fraction, cpu_seconds, cpu_times
from bench.lib.procs import Proc
from bench.lib.wrk import Wrk, WrkRun, WrkStats


@dataclass(frozen=True)
class Sample:
    stats: WrkStats
    gateway_cpu_s: float  # the whole window, settle included
    gateway_run_cpu_s: float  # while wrk ran
    upstream_cpu_s: float
    core_busy: dict[int, float]  # whole core, every process on it, while wrk ran

    @property
    def gateway_cpu_us_per_request(self) -> float:
        return self.gateway_cpu_s * 1e6 / self.stats.requests

    @property
    def gateway_busy(self) -> float:
        """The gateway's CPU time over wrk's wall time: about 1.0 when it saturates a core."""
        return self.gateway_run_cpu_s / self.stats.duration_s


def measure(
    wrk: Wrk,
    url: str,
    key: str,
    connections: int,
    duration: float,
    *,
    gateway: Proc,
    upstream: Proc,
    cores: Sequence[int],
    stream: bool = False,
    settle_s: float = 0.0,
) -> Sample:
    """One gateway under one wrk: ``measure_together`` with a single target."""
    (sample,) = measure_together(
        wrk, [Target(url, key, gateway)], connections, duration,
        upstream=upstream, cores=cores, stream=stream, settle_s=settle_s,
    )  # fmt: skip
    return sample


@dataclass(frozen=True)
class Target:
    """One gateway loaded by ``measure_together``: where its wrk posts, with which key."""

    url: str
    key: str
    gateway: Proc


def load_together(
    wrk: Wrk,
    targets: Sequence[Target],
    connections: int,
    duration: float,
    *,
    upstream: Proc,
    stream: bool = False,
) -> list[WrkStats]:
    """One wrk per target, all started at once; their stats in ``targets``' order.

    If one fails, the others are killed before the error propagates.
    """
    runs: list[WrkRun] = []
    try:
        for t in targets:
            runs.append(wrk.start(t.url, t.key, connections, duration, stream=stream))
        return [
            wrk.collect(run, logs=(t.gateway, upstream))
            for run, t in zip(runs, targets, strict=True)
        ]
    finally:
        for run in runs:
            run.stop()


def measure_together(
    wrk: Wrk,
    targets: Sequence[Target],
    connections: int,
    duration: float,
    *,
    upstream: Proc,
    cores: Sequence[int],
    stream: bool = False,
    settle_s: float = 0.0,
) -> list[Sample]:
    """Load every target at once (same connections and duration); one ``Sample`` per target.

    Each sample's gateway figures are its own; ``core_busy`` is the same for all
    (the cores over the whole run, every process on them), and so is
    ``upstream_cpu_s``: the upstream is shared, so it is its CPU time for the
    window serving all targets, not one target's share.
    """
    cores_before = cpu_times(cores)
    gw_before = [cpu_seconds(t.gateway.pid) for t in targets]
    up_before = cpu_seconds(upstream.pid)
    stats = load_together(wrk, targets, connections, duration, upstream=upstream, stream=stream)
    gw_run = [cpu_seconds(t.gateway.pid) - b for t, b in zip(targets, gw_before, strict=True)]
    cores_after = cpu_times(cores)
    if settle_s > 0:
        time.sleep(settle_s)
    gw_all = [cpu_seconds(t.gateway.pid) - b for t, b in zip(targets, gw_before, strict=True)]
    up_cpu = cpu_seconds(upstream.pid) - up_before
    busy = {c: busy_fraction(cores_before[c], cores_after[c]) for c in cores}
    return [
        Sample(s, total, run, up_cpu, busy)
        for s, total, run in zip(stats, gw_all, gw_run, strict=True)
    ]
