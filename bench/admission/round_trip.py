"""What one Redis round trip costs the gateway's process: the yardstick of bench/admission.

``run.py`` starts this script pinned to the gateway core while the gateways
idle. On uvloop, through the gateway's own client (``cache.redis_client``),
it times ``--calls`` PINGs one after another, then as many admissions through
``cache.spend.SpendCounters.admit`` with the benchmark's budget and limits:
the very call a request makes before it goes upstream (under another tenant,
so the gateways' counters are left alone). It prints one JSON line:
``{"ping": {"p50_us": .., "p99_us": .., "cpu_us": ..}, "admit": {...}}``.

    .venv/bin/python bench/admission/round_trip.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from cache.redis_client import RedisClient
from cache.spend import RateCharge, SpendCounters, rate_key, window_keys

TENANT = "round-trip-probe"


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50 and p99 in µs (nearest rank) of one series of call times."""
    ordered = sorted(samples_ns)
    rank = {50: len(ordered) // 2, 99: min(len(ordered) - 1, len(ordered) * 99 // 100)}
    return {f"p{p}_us": ordered[i] / 1000 for p, i in rank.items()}


async def timed(calls: int, call: Callable[[int], Awaitable[object]]) -> dict[str, float]:
    """``call(i)`` ``calls`` times in a row, after 100 untimed ones: its percentiles, and
    this process's CPU per call."""
    for i in range(100):
        await call(-i - 1)
    samples = []
    cpu = time.process_time_ns()
    for i in range(calls):
        start = time.perf_counter_ns()
        await call(i)
        samples.append(time.perf_counter_ns() - start)
    cpu = time.process_time_ns() - cpu
    return {**percentiles(samples), "cpu_us": cpu / calls / 1000}


async def probe(url: str, calls: int, rpm: int, tpm: int, daily_nanos: int) -> dict[str, object]:
    client = RedisClient(url, call_budget_s=1.0)
    await client.start()
    counters = SpendCounters(client)
    day, _ = window_keys(counters.prefix, TENANT, datetime.now(UTC))
    rates = [
        RateCharge(rate_key(counters.prefix, TENANT, "", "requests"), 1, 60_000 / rpm),
        RateCharge(rate_key(counters.prefix, TENANT, "", "tokens"), 40, 60_000 / tpm),
    ]

    async def ping(_: int) -> object:
        if not await client.ping():
            raise RuntimeError(f"{url}: PING failed")
        return None

    async def admit(i: int) -> object:
        # The hold outlives the probe's run: no expired hold is let go on the way.
        result = await counters.admit(TENANT, f"probe-{i}", 1000, [(day, daily_nanos)], rates, 600)
        if result is None or not result.admitted:
            raise RuntimeError(f"{url}: admission failed or refused: {result}")
        return result

    try:
        pings = await timed(calls, ping)
        return {"calls": calls, "ping": pings, "admit": await timed(calls, admit)}
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the Redis the gateways use")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls of each kind")
    parser.add_argument("--rpm", type=int, required=True, help="requests_per_minute")
    parser.add_argument("--tpm", type=int, required=True, help="tokens_per_minute")
    parser.add_argument("--daily-nanos", type=int, required=True, help="the daily budget")
    args = parser.parse_args()
    result = uvloop.run(probe(args.url, args.calls, args.rpm, args.tpm, args.daily_nanos))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
