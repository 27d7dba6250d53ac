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
  CPU per request, Redis EVALs per request. Goal: the added p50 is about one
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
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from bench.admission.summary import (
    ALONE,
    LABELS,
    LATENCY,
    TOGETHER,
    Run,
    Yardstick,
    latency_table,
    profile_shares,
    round_trip_verdict,
    throughput_table,
    verdict_table,
    yardstick_table,
)
from bench.lib import HOST, BenchError
from bench.lib.cpu import cpu_seconds, load_average
from bench.lib.entry import add_load_arguments, add_profile_arguments, clean_env, run_benchmark
from bench.lib.measure import Target, measure, measure_together
from bench.lib.net import http
from bench.lib.procs import Procs, pinned, run_quiet
from bench.lib.profile import ensure_pyspy, summarise_profile, under_pyspy
from bench.lib.redis_server import RedisServer, redis_version, start_redis
from bench.lib.report import publish, section_head
from bench.lib.stack import (
    MODEL,
    Server,
    gateway_config,
    sanity_check,
    start_gateway,
    start_sim,
    wait_gateway,
    wait_sim,
)
from bench.lib.wrk import Wrk, ensure_wrk
from cache.spend import hold_keys, window_keys
from metering.budget import REMAINING_HEADER

API_KEY = "sk-tollway-bench-admission"
TENANT = "bench"
# Limits that never refuse: every request still makes the whole admission call.
DAILY_USD = 1_000_000
RPM = 100_000_000
TPM = 1_000_000_000
ROUND_TRIP = Path(__file__).resolve().parent / "round_trip.py"
BUDGET_CALLS = ("budget.admit", "spend.add")  # RedisClient operations of admission


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
    parser.add_argument(
        "--together-rounds", type=int, default=5,
        help="throughput rounds with both gateways loaded at once",
    )  # fmt: skip
    parser.add_argument("--together-duration", type=int, default=5, help="seconds per round")
    parser.add_argument(
        "--alone-rounds", type=int, default=3,
        help="throughput rounds with one gateway at a time, taking turns (--duration s each)",
    )  # fmt: skip
    parser.add_argument("--calls", type=int, default=2000, help="timed calls of the yardstick")
    parser.add_argument(
        "--settle", type=float, default=0.3,
        help="seconds a run's CPU window stays open after wrk stops, so the releases its "
        "requests left to the next flush (every 0.2 s) are charged to it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.duration, args.repeats, args.connections, args.together_duration) < 1:
        parser.error("--duration, --repeats, --connections, --together-duration must be >= 1")
    if min(args.together_rounds, args.alone_rounds) < 0 or args.calls < 1 or args.settle < 0:
        parser.error("rounds must be >= 0, --calls >= 1, --settle >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("admission", parse_args(argv), execute)


@dataclass(frozen=True)
class Stack:
    sim: Server
    redis: RedisServer
    gateways: dict[bool, Server]  # by admission on
    cache: str  # the gateways' x-tollway-cache on wrk's kind of request


def start_stack(args: argparse.Namespace, procs: Procs, tmp: Path) -> Stack:
    """Redis, the simulator and both gateways, ready; each gateway's answer checked for
    the headers of admission (present on one, absent on the other)."""
    redis = start_redis(procs, tmp, args.load_cpu)
    sim = start_sim(procs, tmp, args.load_cpu)
    common: dict[str, Any] = {"redis": {"url": redis.url}}
    limits: dict[str, Any] = {
        "budgets": {TENANT: {"daily_usd": DAILY_USD}},
        "rate_limits": {TENANT: {"requests_per_minute": RPM, "tokens_per_minute": TPM}},
    }
    keys = [{"key": API_KEY, "tenant": TENANT}]
    gateways = {
        on: start_gateway(
            procs, tmp, args.gateway_cpu,
            gateway_config(sim, keys, **common, **(limits if on else {})),
            name=f"admission-{'on' if on else 'off'}", env=clean_env(),
        )
        for on in (True, False)
    }  # fmt: skip
    wait_sim(sim, args.load_cpu)
    cache = ""
    for on, gateway in gateways.items():
        wait_gateway(gateway, args.gateway_cpu)
        headers = sanity_check(LABELS[on], gateway.chat_url, API_KEY, gateway=True)
        for header in ("x-ratelimit-limit-requests", REMAINING_HEADER):
            if (header in headers) != on:
                raise BenchError(
                    f"{LABELS[on]} answered {'without' if on else 'with'} {header}: "
                    f"admission is not {'on' if on else 'off'}"
                )
        cache = headers.get("x-tollway-cache", "none")
    return Stack(sim, redis, gateways, cache)


def yardstick(args: argparse.Namespace, redis: RedisServer) -> Yardstick:
    """``round_trip.py`` on the gateway core: PING and the admission call, timed."""
    argv = [
        sys.executable, str(ROUND_TRIP), "--url", redis.url, "--calls", str(args.calls),
        "--rpm", str(RPM), "--tpm", str(TPM), "--daily-nanos", str(DAILY_USD * 10**9),
    ]  # fmt: skip
    done = run_quiet(pinned(args.gateway_cpu, argv))
    if done.returncode != 0:
        raise BenchError(f"round_trip.py failed ({done.returncode}):\n{done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    ping, admit = figures["ping"], figures["admit"]
    return Yardstick(
        args.calls, ping["p50_us"], ping["p99_us"], ping["cpu_us"],
        admit["p50_us"], admit["p99_us"], admit["cpu_us"],
    )  # fmt: skip


@dataclass
class Bench:
    """What every measured run needs: the options, the load, the stack, a Redis client; and
    how many requests to the admission-on gateway a stopping wrk may have cut off."""

    args: argparse.Namespace
    wrk: Wrk
    stack: Stack
    redis: Redis
    cut_off: int = 0  # a wrk run stops with up to one request per connection in flight

    @property
    def cores(self) -> tuple[int, int]:
        return (self.args.gateway_cpu, self.args.load_cpu)

    def evals(self) -> int:
        """Scripts Redis has run since it started (every caller's)."""
        stats: dict[str, dict[str, int]] = self.redis.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("eval", "evalsha"))

    def warm_up(self) -> None:
        for on, gateway in self.stack.gateways.items():
            self.wrk.run(gateway.chat_url, API_KEY, self.args.connections, self.args.warmup,
                         logs=(gateway.proc, self.stack.sim.proc))  # fmt: skip
            self.cut_off += self.args.connections if on else 0

    def one(self, phase: str, round: int, on: bool, connections: int) -> Run:
        """One gateway alone under one wrk, with Redis's CPU and EVALs over the same window."""
        gateway = self.stack.gateways[on]
        redis_cpu, evals = cpu_seconds(self.stack.redis.proc.pid), self.evals()
        sample = measure(
            self.wrk, gateway.chat_url, API_KEY, connections, self.args.duration,
            gateway=gateway.proc, upstream=self.stack.sim.proc, cores=self.cores,
            settle_s=self.args.settle,
        )  # fmt: skip
        redis_cpu = cpu_seconds(self.stack.redis.proc.pid) - redis_cpu
        self.cut_off += connections if on else 0
        return Run(phase, round, on, sample, redis_cpu, self.evals() - evals)

    def both(self, round: int) -> list[Run]:
        """Both gateways at once, each under its own wrk."""
        targets = [Target(self.stack.gateways[on].chat_url, API_KEY, self.stack.gateways[on].proc)
                   for on in (True, False)]  # fmt: skip
        samples = measure_together(
            self.wrk, targets, self.args.connections, self.args.together_duration,
            upstream=self.stack.sim.proc, cores=self.cores, settle_s=self.args.settle,
        )  # fmt: skip
        self.cut_off += self.args.connections
        pairs = zip((True, False), samples, strict=True)
        return [Run(TOGETHER, round, on, sample) for on, sample in pairs]

    def profile(self, procs: Procs, tmp: Path) -> str:
        """One more run against the admission-on gateway, alone, under py-spy: its summary."""
        args, gateway = self.args, self.stack.gateways[True]
        conns, seconds = args.profile_connections, args.profile_duration
        stats, raw = under_pyspy(
            procs, tmp, gateway.proc.pid, args.load_cpu,
            lambda: self.wrk.run(gateway.chat_url, API_KEY, conns, seconds,
                                 logs=(gateway.proc, self.stack.sim.proc)),
            rate=args.profile_rate, native=args.profile_native,
        )  # fmt: skip
        self.cut_off += conns
        shares = profile_shares(raw.read_text(errors="replace"))
        return "\n".join([
            f"profiled run of the admission-on gateway ({conns} conns, {seconds} s, py-spy at "
            f"{args.profile_rate} Hz{', native' if args.profile_native else ''}, so slower "
            f"than unprofiled): {stats.rps:.0f} req/s, p50 {stats.p50_us} µs",
            "admission's share of the samples (on the stack):",
            *(f"  {line}" for line in shares),
            summarise_profile(raw, args.profile_top),
        ])  # fmt: skip


def taking_turns(bench: Bench, phase: str, rounds: int, connections: int) -> list[Run]:
    runs = []
    for round in range(rounds):
        for on in (True, False) if round % 2 else (False, True):
            runs.append(bench.one(phase, round, on, connections))
            print(f"  {runs[-1].line()}", flush=True)
    return runs


def measure_all(args: argparse.Namespace, bench: Bench) -> list[Run]:
    print(f"warming up ({args.warmup} s per gateway) ...", flush=True)
    bench.warm_up()
    print(f"latency: {args.repeats} rounds of {args.duration} s per gateway, 1 connection")
    runs = taking_turns(bench, LATENCY, args.repeats, 1)
    print(
        f"throughput, both at once: {args.together_rounds} rounds of "
        f"{args.together_duration} s, {args.connections} connections each",
        flush=True,
    )
    for round in range(args.together_rounds):
        runs += bench.both(round)
        print("".join(f"  {run.line()}\n" for run in runs[-2:]), end="", flush=True)
    print(
        f"throughput, one at a time: {args.alone_rounds} rounds of {args.duration} s per "
        f"gateway, {args.connections} connections",
        flush=True,
    )
    runs += taking_turns(bench, ALONE, args.alone_rounds, args.connections)
    return runs


def metric_sum(gateway: Server, name: str, labels: dict[str, tuple[str, ...]]) -> float:
    """The sum of ``name``'s samples on the gateway's /metrics whose labels match."""
    status, _, body = http("GET", f"{gateway.base}/metrics")
    if status != 200:
        raise BenchError(f"{gateway.base}/metrics answered {status}")
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
        and all(sample.labels.get(k) in allowed for k, allowed in labels.items())
    )


def check_settled(bench: Bench) -> str:
    """No request was served unchecked, no budget call failed, and the holds left in Redis
    (once the last flush has run) are few enough to be requests a stopping wrk cut off
    during their admission call, and add up to the tenant's ``held``: a note saying so."""
    time.sleep(1.0)  # the last releases: the flush runs every 0.2 s
    holds, hold = hold_keys("tollway", TENANT)
    day, _ = window_keys("tollway", TENANT, dt.datetime.now(dt.UTC))
    left = [str(rid) for rid in bench.redis.zrange(holds, 0, -1)]
    amounts = [int(str(h).split()[0]) for h in bench.redis.hmget(hold, left)] if left else []
    held = int(bench.redis.hget(day, "held") or 0)
    if len(left) > bench.cut_off or held != sum(amounts):
        raise BenchError(
            f"after the load, {len(left)} holds are in Redis (at most {bench.cut_off} requests "
            f"were cut off) holding {sum(amounts)} nano-USD, and the tenant's day holds {held}"
        )
    gateway = bench.stack.gateways[True]
    unchecked = metric_sum(gateway, "tollway_budget_unchecked_total", {})
    failed = metric_sum(gateway, "tollway_redis_failures_total", {"operation": BUDGET_CALLS})
    served = metric_sum(gateway, "tollway_requests_total", {"status": ("200",)})
    if unchecked or failed:
        raise BenchError(
            f"{LABELS[True]}: {unchecked:.0f} requests served unchecked, {failed:.0f} failed "
            "budget calls: it did not admit every request"
        )
    return (
        f"check: the admission-on gateway answered {served:,.0f} requests (200), none served "
        f"unchecked and no failed call of {', '.join(BUDGET_CALLS)}; afterwards {len(left)} "
        f"holds were left in Redis (of the {bench.cut_off} requests stopping wrk runs could "
        "cut off) and the tenant's `held` was their sum: every settled request let its hold "
        "go; a request whose client leaves during its admission call keeps its hold until "
        "`reservations.hold_s`"
    )


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
            "per request wrk counted; Redis: its CPU and the EVALs it ran (`INFO "
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
