"""Metering's cost in machine instructions per request: deterministic, under callgrind.

The CPU benchmark (``run.py``) drifts by a point or two between runs. This one
counts what the CPU executes: each gateway (metering on, then off) runs under
valgrind's callgrind on the gateway core, serves ``--warmup`` requests, has its
counters zeroed, serves ``--requests`` more (16 connections, unique prompts, the
simulator with ``--zero-delay``), waits for the last batches to be written, and
dumps. Instructions per request are the dump's total over the requests, per
thread (the main thread is the event loop; the "on" gateway has the span
exporter's thread too).

Under callgrind the gateway runs ~20x slower, so anything batched by time
gets smaller batches: ``ledger.write_interval_s`` is raised (``--ledger-interval``,
default 20 s, about what 1 s holds at full speed); the recorder's 0.1 s and
the span exporter's 5 s are not, so their per-batch shares are overstated
(the exporter's thread most: compare the event loop's column), and the totals
vary by ~0.5% between runs with how fast valgrind ran. The event loop's ratio
tracked the CPU benchmark's within ~1-2 points in 2026-11-23's runs
(bench/RESULTS.md).

    .venv/bin/python bench/metering/instructions.py [--requests N] [--warmup N] [--no-record]

Needs ``valgrind`` (``apt-get install -y valgrind``); about 3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import HOST, BenchError
from bench.lib.entry import clean_env, run_benchmark
from bench.lib.net import free_port, wait_ready
from bench.lib.otlp_sink import start_sink
from bench.lib.procs import Procs, pinned
from bench.lib.redis_server import start_redis
from bench.lib.report import record, section_head
from bench.lib.stack import MODEL, gateway_config, start_sim, tollway_bin, wait_sim

KEY = "sk-tollway-bench-instructions"
SIDES = ("on", "off")
TARGET = 0.10
_TOTAL = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per side")
    parser.add_argument("--warmup", type=int, default=500, help="requests before the count")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--ledger-interval", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=25.0, help="seconds before the dump")
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.requests < 100 or args.warmup < 0 or args.connections < 1:
        parser.error("--requests must be at least 100, --warmup >= 0, --connections >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if shutil.which("valgrind") is None:
        print("error: valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    return run_benchmark("instructions", parse_args(argv), execute)


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    counts = {side: measure(args, procs, tmp, side) for side in SIDES}
    on, off = (sum(counts[side]) / args.requests for side in SIDES)
    main_on, main_off = (counts[side][0] / args.requests for side in SIDES)
    cost = (on - off) / off
    lines = [
        "| metering | instructions per request | event loop's thread | other threads |",
        "|---|---:|---:|---:|",
        *(
            f"| {side} | {sum(counts[side]) / args.requests:,.0f} | "
            f"{counts[side][0] / args.requests:,.0f} | "
            f"{sum(counts[side][1:]) / args.requests:,.0f} |"
            for side in SIDES
        ),
        f"| metering's cost: (on - off) / off | {cost:+.1%} (+{on - off:,.0f}) | "
        f"{(main_on - main_off) / main_off:+.1%} | - |",
    ]
    notes = [
        f"{args.requests:,} requests per side counted after {args.warmup:,} uncounted, "
        f"{args.connections} connections, non-streaming, unique prompts, max_tokens 16; "
        "upstream `tollway sim --zero-delay`; the on gateway: Prometheus, Redis ledger "
        f"(write interval {args.ledger_interval:g} s), OTLP spans at the default 1% sampling",
        f"target: metering adds <= {TARGET:.0%}: {'met' if cost <= TARGET else 'NOT met'}",
    ]
    section = "\n".join(
        [
            *section_head("metering in instructions (callgrind)", started, command),
            "",
            *lines,
            "",
            *(f"- {note}" for note in notes),
            "",
        ]
    )
    print(section)
    if not args.no_record:
        record(section)


def measure(args: argparse.Namespace, procs: Procs, tmp: Path, side: str) -> list[int]:
    """One gateway under callgrind: instructions per thread over ``args.requests`` requests."""
    work = tmp / side
    work.mkdir()
    redis = start_redis(procs, work, args.load_cpu)
    sink = start_sink(procs, work, args.load_cpu)
    sim = start_sim(procs, work, args.load_cpu)
    sections: dict[str, Any] = {
        "redis": {"url": redis.url},
        "ledger": {"write_interval_s": args.ledger_interval},
    }
    if side == "off":
        sections["metering"] = {"enabled": False}
    config = work / "gateway.yaml"
    keys = [{"key": KEY, "tenant": f"bench-{side}"}]
    config.write_text(yaml.safe_dump(gateway_config(sim, keys, **sections), sort_keys=False))
    env = clean_env()
    if side == "on":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.base
    port = free_port()
    out = work / "callgrind.out"
    gateway = procs.start(
        f"gateway-{side}",
        pinned(args.gateway_cpu, [
            "valgrind", "--tool=callgrind", "--separate-threads=yes", "--dump-instr=no",
            f"--callgrind-out-file={out}", sys.executable, tollway_bin(), "serve",
            "--config", str(config), "--host", HOST, "--port", str(port),
            "--log-level", "warning", "--drain-timeout", "1",
        ]),
        work / "gateway.log",
        env=env,
    )  # fmt: skip
    wait_sim(sim, args.load_cpu)
    wait_ready(gateway, f"http://{HOST}:{port}/health", timeout=600)
    url = f"http://{HOST}:{port}/v1/chat/completions"
    print(f"{side}: warming up ({args.warmup} requests) ...", flush=True)
    asyncio.run(load(url, args.warmup, args.connections))
    callgrind_control("-z", gateway.popen.pid)
    print(f"{side}: counting {args.requests} requests ...", flush=True)
    t0 = time.monotonic()
    asyncio.run(load(url, args.requests, args.connections))
    print(f"{side}: served in {time.monotonic() - t0:.0f} s; settling", flush=True)
    time.sleep(args.settle)  # the last ledger batch and span export, counted
    callgrind_control("-d", gateway.popen.pid)
    procs.stop(gateway)
    dumps = sorted(work.glob("callgrind.out.1-*"))  # the dump: one file per thread
    if not dumps:
        raise BenchError(f"callgrind wrote no dump for {side} (see {work / 'gateway.log'})")
    return [instructions(path) for path in dumps]


async def load(url: str, requests: int, connections: int) -> None:
    """``requests`` chat completions, ``connections`` at a time; any non-200 fails the run."""
    nonce = os.urandom(4).hex()
    issued = 0
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"count {nonce}-{issued}"}],
                    "max_tokens": 16,
                }
                async with session.post(url, json=body) as response:
                    await response.read()
                    if response.status != 200:
                        raise BenchError(f"POST {url} answered {response.status}")

        await asyncio.gather(*(worker() for _ in range(connections)))


def callgrind_control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


def instructions(dump: Path) -> int:
    found = _TOTAL.search(dump.read_text(errors="replace"))
    return int(found.group(1)) if found else 0


if __name__ == "__main__":
    sys.exit(main())
