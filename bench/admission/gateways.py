"""bench/admission's system under test and its runs: the two gateways, the yardstick, the
measured runs (one gateway at a time, or both at once) and the checks afterwards.

Two ``tollway serve`` on the gateway core with the same config, one of them with a
budget and rate limits for its tenant that never refuse; the simulator, Redis and wrk on
the load core (``bench.lib``). With one gateway loaded, Redis's CPU and the scripts it
ran are taken over the same window as the gateway's figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from bench.admission.summary import (
    ALONE,
    LABELS,
    LATENCY,
    TOGETHER,
    Run,
    Yardstick,
    profile_shares,
)
from bench.lib import BenchError
from bench.lib.cpu import cpu_seconds
from bench.lib.entry import clean_env
from bench.lib.measure import Target, measure, measure_together
from bench.lib.net import http
from bench.lib.procs import Procs, pinned, run_quiet
from bench.lib.profile import profile_gateway, summarise_profile
from bench.lib.redis_server import RedisServer, start_redis
from bench.lib.stack import (
    Server,
    gateway_config,
    sanity_check,
    start_gateway,
    start_sim,
    wait_gateway,
    wait_sim,
)
from bench.lib.wrk import Wrk
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
        """One gateway alone under one wrk, with Redis's CPU and scripts over the same window."""
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
        _, raw, title = profile_gateway(
            args, procs, tmp, self.wrk, gateway, self.stack.sim, API_KEY,
            connections=conns, duration=seconds,
        )  # fmt: skip
        self.cut_off += conns
        shares = profile_shares(raw.read_text(errors="replace"))
        return "\n".join([
            f"profiled run of the admission-on gateway {title}",
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
        "go (a request whose client left during its admission call too, at its settlement)"
    )
