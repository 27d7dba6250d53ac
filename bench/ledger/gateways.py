"""Part 2 of bench/ledger: the gateway's throughput with the ledger on vs off, and its rows.

Two ``tollway serve`` on the gateway core, the same simulator and Redis on the
load core (with PostgreSQL); the one with the ledger has ``database:`` and a
spool directory, the other no database. Loaded as bench/overhead loads a
gateway (``bench.lib.measure``, wrk with unique prompts), in two ways:

- **alone**: one gateway at a time, the two taking turns (reversed every other
  round): each has the core to itself, so its requests/s and CPU per request
  compare with bench/overhead's;
- **together**: both at once, each under its own wrk, sharing the core (about
  half each): noise from the host hits both at the same instants, so each
  round's ratio on / off is steady where the alone rounds' swing by ±10%.

Afterwards every request the ledger-on gateway finished must be one row in
PostgreSQL.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from bench.ledger.postgres import ledger_counts, postmaster_pid, tree_cpu_seconds
from bench.ledger.summary import ALONE, LABELS, TOGETHER, GatewayRun, metric_total
from bench.lib import BenchError
from bench.lib.entry import clean_env
from bench.lib.measure import Sample, Target, measure, measure_together
from bench.lib.net import http
from bench.lib.procs import Procs
from bench.lib.profile import profile_gateway, summarise_profile
from bench.lib.redis_server import start_redis
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
from tests.support.postgres_server import PostgresServer

API_KEY = "sk-tollway-bench-ledger"
COST_HEADER = "x-tollway-cost-usd"  # both gateways meter; only one keeps a ledger


@dataclass
class Served:
    """What wrk and the sanity checks counted from the ledger-on gateway, and how many wrk
    runs it took (each may leave one request per connection in flight when it stops)."""

    answers: int = 2  # the sanity checks: one plain, one streamed
    runs: int = 0

    def add(self, requests: int) -> None:
        self.answers += requests
        self.runs += 1


@dataclass(frozen=True)
class GatewayResult:
    runs: list[GatewayRun]
    checked: str  # the note on the ledger's row count
    profile: str | None


def start_gateways(
    args: argparse.Namespace, procs: Procs, tmp: Path, server: PostgresServer
) -> tuple[Server, dict[bool, Server]]:
    """The simulator, Redis and both gateways, ready and checked: ``(sim, gateways)``."""
    redis = start_redis(procs, tmp, args.load_cpu)
    sim = start_sim(procs, tmp, args.load_cpu)
    keys = [{"key": API_KEY, "tenant": "bench"}]
    configs = {
        True: gateway_config(
            sim, keys, redis={"url": redis.url}, database={"url": server.url},
            ledger={"spool_dir": str(tmp / "gateway-spool")},
        ),
        False: gateway_config(sim, keys, redis={"url": redis.url}),
    }  # fmt: skip
    gateways = {
        ledger: start_gateway(
            procs, tmp, args.gateway_cpu, config, name=f"ledger-{'on' if ledger else 'off'}",
            env=clean_env(),
        )
        for ledger, config in configs.items()
    }  # fmt: skip
    wait_sim(sim, args.load_cpu)
    for ledger, gateway in gateways.items():
        wait_gateway(gateway, args.gateway_cpu)
        if COST_HEADER not in sanity_check(LABELS[ledger], gateway.chat_url, API_KEY, gateway=True):
            raise BenchError(f"{LABELS[ledger]} answered without {COST_HEADER}: not metered")
    wait_for_ledger(gateways[True], server, within_s=15)  # the sanity checks' two rows
    return sim, gateways


def run_gateways(
    args: argparse.Namespace, procs: Procs, tmp: Path, wrk: Wrk, server: PostgresServer
) -> GatewayResult:
    postgres = postmaster_pid(server)
    sim, gateways = start_gateways(args, procs, tmp, server)
    served = Served()
    print(f"warming up ({args.warmup} s per gateway) ...", flush=True)
    for ledger, gateway in gateways.items():
        stats = wrk.run(gateway.chat_url, API_KEY, args.connections, args.warmup,
                        logs=(gateway.proc, sim.proc))  # fmt: skip
        if ledger:
            served.add(stats.requests)
    runs: list[GatewayRun] = []
    print(f"alone: {args.repeats} rounds of {args.duration} s per gateway", flush=True)
    for repeat in range(args.repeats):
        for ledger in (True, False) if repeat % 2 == 0 else (False, True):
            gateway = gateways[ledger]
            db_before = tree_cpu_seconds(postgres)
            sample = measure(
                wrk, gateway.chat_url, API_KEY, args.connections, args.duration,
                gateway=gateway.proc, upstream=sim.proc,
                cores=(args.gateway_cpu, args.load_cpu), settle_s=args.settle,
            )  # fmt: skip
            db = tree_cpu_seconds(postgres) - db_before
            runs.append(run_of(ALONE, repeat, ledger, sample, db, args))
            print(f"  {runs[-1].line()}", flush=True)
            if ledger:
                served.add(sample.stats.requests)
    print(f"together: {args.together_rounds} rounds of {args.together_duration} s", flush=True)
    targets = [Target(gateways[ledger].chat_url, API_KEY, gateways[ledger].proc)
               for ledger in (True, False)]  # fmt: skip
    for repeat in range(args.together_rounds):
        db_before = tree_cpu_seconds(postgres)
        on, off = measure_together(
            wrk, targets, args.connections, args.together_duration, upstream=sim.proc,
            cores=(args.gateway_cpu, args.load_cpu), settle_s=args.settle,
        )  # fmt: skip
        db = tree_cpu_seconds(postgres) - db_before
        runs += [
            run_of(TOGETHER, repeat, True, on, db, args),
            run_of(TOGETHER, repeat, False, off, None, args),
        ]
        print("".join(f"  {run.line()}\n" for run in runs[-2:]), end="", flush=True)
        served.add(on.stats.requests)
    text = None
    if args.profile:
        text = profile(args, procs, tmp, wrk, gateways[True], sim, served)
    checked = check_rows(gateways[True], server, served, args.connections)
    print(checked, flush=True)
    for gateway in gateways.values():  # before the database they write to
        procs.stop(gateway.proc)
    return GatewayResult(runs, checked, text)


def run_of(
    mode: str, repeat: int, ledger: bool, sample: Sample, db_cpu_s: float | None,
    args: argparse.Namespace,
) -> GatewayRun:  # fmt: skip
    return GatewayRun(
        mode=mode,
        round=repeat,
        ledger=ledger,
        requests=sample.stats.requests,
        duration_s=sample.stats.duration_s,
        gateway_cpu_s=sample.gateway_cpu_s,
        gateway_run_cpu_s=sample.gateway_run_cpu_s,
        db_cpu_s=db_cpu_s,
        gateway_core_busy=sample.core_busy[args.gateway_cpu],
        load_core_busy=sample.core_busy[args.load_cpu],
    )


def gateway_counts(gateway: Server) -> tuple[int, int, int]:
    """The gateway's own (finished requests, ledger rows written, rows not yet written)."""
    status, _, body = http("GET", f"{gateway.base}/metrics")
    if status != 200:
        raise BenchError(f"{gateway.base}/metrics answered {status}")
    text = body.decode()
    return (
        int(metric_total(text, "tollway_requests_total")),
        int(metric_total(text, "tollway_ledger_rows_written_total")),
        int(metric_total(text, "tollway_ledger_spool_rows")),
    )


def wait_for_ledger(gateway: Server, server: PostgresServer, within_s: float) -> tuple[int, int]:
    """Until every request the gateway finished has its row in PostgreSQL: (requests, rows)."""
    deadline = time.monotonic() + within_s
    while True:
        finished, written, waiting = gateway_counts(gateway)
        stored, summed = ledger_counts(server)
        if not waiting and written == finished == stored == summed:
            return finished, stored
        if time.monotonic() > deadline:
            raise BenchError(
                f"after {within_s:g} s the ledger-on gateway has finished {finished:,} requests "
                f"and written {written:,} rows ({waiting:,} waiting); PostgreSQL holds "
                f"{stored:,} rows summed as {summed:,} requests\n{gateway.proc.log_tail()}"
            )
        time.sleep(0.2)


def check_rows(gateway: Server, server: PostgresServer, served: Served, connections: int) -> str:
    """Every request the ledger-on gateway finished is one row in PostgreSQL; a note saying so."""
    finished, stored = wait_for_ledger(gateway, server, within_s=30)
    in_flight = served.runs * connections
    if not served.answers <= stored <= served.answers + in_flight:
        raise BenchError(
            f"PostgreSQL holds {stored:,} rows; wrk and the sanity checks counted "
            f"{served.answers:,} answers, and at most {in_flight} more could be in flight"
        )
    return (
        f"ledger check: PostgreSQL holds {stored:,} rows of the ledger-on gateway, one per "
        f"request it finished ({finished:,} in its `tollway_requests_total`), and as many "
        f"requests summed in `usage_hourly`; wrk and the sanity checks counted "
        f"{served.answers:,} answers, the {stored - served.answers} others were in flight "
        f"when one of the {served.runs} wrk runs stopped"
    )


def profile(
    args: argparse.Namespace, procs: Procs, tmp: Path, wrk: Wrk, gateway: Server, sim: Server,
    served: Served,
) -> str:  # fmt: skip
    """One more run against the ledger-on gateway, alone, under py-spy: its summary."""
    stats, raw, title = profile_gateway(
        args, procs, tmp, wrk, gateway, sim, API_KEY,
        connections=args.connections, duration=args.duration,
    )  # fmt: skip
    served.add(stats.requests)
    return f"profiled run of the ledger-on gateway {title}\n" + summarise_profile(
        raw, args.profile_top
    )
