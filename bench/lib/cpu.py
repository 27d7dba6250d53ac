"""CPU accounting from /proc: a process's CPU time, each core's busy share, the load average."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times(cpus: Sequence[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per cpu since boot, from /proc/stat."""
    times: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def two_cpus_problem(gateway_cpu: int, load_cpu: int) -> str | None:
    """Why the gateway and the load cannot get a core each, or None if they can."""
    allowed = os.sched_getaffinity(0)
    if gateway_cpu == load_cpu or not {gateway_cpu, load_cpu} <= allowed:
        return (
            f"need two distinct cpus from {sorted(allowed)} "
            f"(--gateway-cpu {gateway_cpu}, --load-cpu {load_cpu})"
        )
    return None
