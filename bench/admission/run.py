"""Admission's cost: what a budget and rate limits add to each request, and to throughput.

With a budget or rate limits for its tenant, each request the gateway sends
upstream first makes one Redis call (``cache.spend``'s ADMIT script: take its
units from every rate limit, hold its worst-case cost against every budget),
and its settlement adds one release to the next batched flush. This measures
that, against the same gateway without them:

- two ``tollway serve`` on the gateway core, one with ``budgets`` and
  ``rate_limits`` for its tenant (limits so high they never refuse), one
  without; the simulator (``--zero-delay``), Redis and wrk on the load core;
- **the yardstick** (``round_trip.py``): a PING, and the admission call
  alone, timed from the gateway core through the gateway's own Redis client;
- **latency at 1 connection**: ``--repeats`` rounds of ``--duration`` s per
  gateway, one at a time, taking turns; p50/p99, the gateway's and Redis's
  CPU per request, Redis scripts per request. Goal: the added p50 is about one
  Redis round trip (``summary.ROUND_TRIPS_GOAL`` PINGs at most);
- **throughput at ``--connections``**: ``--together-rounds`` of
  ``--together-duration`` s with both gateways loaded at once (each by its
  own wrk: the steady ratio on a noisy VM), then ``--alone-rounds`` taking
  turns; requests/s and CPU per request, on / off.

Afterwards no request may have been served unchecked, no budget call may have
failed, and the holds left in Redis may only be requests a stopping wrk cut
off during their admission call (their sum the tenant's ``held``). Unless
``--no-record``, the run replaces the ``admission`` section of
``bench/RESULTS.md``. See ``bench/admission/README.md``.

    .venv/bin/python bench/admission/run.py [--duration 2] [--repeats 10]
        [--together-rounds 5] [--alone-rounds 3] [--no-record] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from redis import Redis

from bench.admission.gateways import (
    DAILY_USD,
    RPM,
    TENANT,
    TPM,
    Bench,
    check_settled,
    measure_all,
    start_stack,
    yardstick,
)
from bench.admission.summary import (
    ALONE,
    TOGETHER,
    latency_table,
    round_trip_verdict,
    throughput_table,
    verdict_table,
    yardstick_table,
)
from bench.lib import HOST
from bench.lib.cpu import load_average
from bench.lib.entry import (
    add_load_arguments,
    add_profile_arguments,
    add_turns_arguments,
    check_turns_arguments,
    run_benchmark,
)
from bench.lib.procs import Procs
from bench.lib.profile import ensure_pyspy
from bench.lib.redis_server import redis_version
from bench.lib.report import publish, section_head
from bench.lib.stack import MODEL
from bench.lib.wrk import Wrk, ensure_wrk


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_load_arguments(
        parser,
        repeats=10,
        repeats_help="rounds at 1 connection: each runs both gateways once, taking turns",
        load_help="wrk, the simulator and Redis",
        gateway_help="both gateways, and the round-trip yardstick",
    )
    parser.set_defaults(duration=2)
    add_profile_arguments(parser)
    parser.add_argument(
        "--profile-connections", type=int, default=1, help="wrk's connections when profiling"
    )
    parser.add_argument("--profile-duration", type=int, default=8, help="seconds profiled")
    add_turns_arguments(
        parser,
        together_duration=5,
        rounds_help="throughput rounds with both gateways loaded at once",
        settle_s=0.3,
        settle_help="seconds a run's CPU window stays open after wrk stops, so the releases "
        "its requests left to the next flush (every 0.2 s) are charged to it",
    )
    parser.add_argument(
        "--alone-rounds", type=int, default=3,
        help="throughput rounds with one gateway at a time, taking turns (--duration s each)",
    )  # fmt: skip
    parser.add_argument("--calls", type=int, default=2000, help="timed calls of the yardstick")
    args = parser.parse_args(argv)
    if min(args.duration, args.repeats, args.connections) < 1:
        parser.error("--duration, --repeats, --connections must be >= 1")
    if args.alone_rounds < 0 or args.calls < 1:
        parser.error("--alone-rounds must be >= 0, --calls >= 1")
    check_turns_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("admission", parse_args(argv), execute)


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    wrk = Wrk(ensure_wrk(), args.load_cpu, MODEL, args.max_tokens)
    if args.profile:
        ensure_pyspy()
    stack = start_stack(args, procs, tmp)
    print(f"yardstick: {args.calls} PINGs and admission calls from cpu {args.gateway_cpu}")
    stick = yardstick(args, stack.redis)
    print(
        f"  PING p50 {stick.ping_p50_us:.0f} µs, admission call p50 {stick.admit_p50_us:.0f} µs",
        flush=True,
    )
    with Redis(host=HOST, port=stack.redis.port, decode_responses=True) as client:
        bench = Bench(args, wrk, stack, client)
        runs = measure_all(args, bench)
        profile_text = bench.profile(procs, tmp) if args.profile else None
        checked = check_settled(bench)
    print(checked, flush=True)
    parts = [
        f"Latency at 1 connection, one gateway at a time, each alone on cpu {args.gateway_cpu}:",
        latency_table(runs),
        f"The yardstick: {args.calls:,} calls of each, one after another:",
        yardstick_table(stick),
        "Goal:",
        verdict_table(round_trip_verdict(runs, stick)),
    ]
    for phase, title in (
        (TOGETHER, f"both at once, {args.connections} conns each"),
        (ALONE, f"one at a time, {args.connections} conns"),
    ):
        table = throughput_table(runs, phase, title)
        if table:
            parts += [f"Throughput, {title}:", table]
    publish(
        result="\n\n".join(parts),
        notes=[
            f"load average (1/5/15 min): {load_before} before, {load_average()} after",
            f"admission on: `budgets: {{{TENANT}: {{daily_usd: {DAILY_USD}}}}}`, "
            f"`rate_limits: {{{TENANT}: {{requests_per_minute: {RPM}, tokens_per_minute: "
            f"{TPM}}}}}` (never refusing); off: the same config without them; both with "
            f"Redis (response cache: `x-tollway-cache: {stack.cache}`; unique prompts) and "
            "metering on; upstream `tollway sim --zero-delay`; max_tokens "
            f"{args.max_tokens}",
            f"latency: medians of {args.repeats} rounds of {args.duration} s per gateway, the "
            "two taking turns (reversed every other round); added: the median of the rounds' "
            "differences, on minus off. Throughput: medians of the rounds, on / off the median "
            "of the rounds' ratios",
            f"CPU: utime + stime over the run plus {args.settle:g} s (the flush of releases), "
            "per request wrk counted; Redis: its CPU and the scripts it ran (`INFO "
            "commandstats`) over the same window, one gateway loaded",
            f"yardstick: `round_trip.py` pinned to cpu {args.gateway_cpu} on uvloop, through "
            "the gateway's `RedisClient`, while the gateways idled",
            checked,
        ],
        head=section_head(
            "admission",
            "What a tenant's budget and rate limits cost each request (one Redis call at "
            "dispatch, a release in the batched flush): latency at 1 connection against one "
            "Redis round trip, and throughput, admission on vs off.",
            started,
            command,
            [redis_version()],
        ),
        pinning=f"both gateways and the yardstick on cpu {args.gateway_cpu}; wrk, simulator "
        f"and Redis on cpu {args.load_cpu}",
        runs_detail="\n".join(f"- {run.line()}" for run in runs),
        profile_text=profile_text,
        no_record=args.no_record,
    )


if __name__ == "__main__":
    sys.exit(main())
