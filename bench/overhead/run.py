"""The gateway's own cost: tollway vs the thinnest FastAPI + aiohttp proxy vs the upstream.

Pins everything between wrk and the upstream to one core (the gateway core)
and the load generator (wrk), the upstream (the simulator with
``--zero-delay``) and Redis to the other, then measures four paths in one run,
taking turns:

- **direct**: wrk to the simulator;
- **thin proxy**: ``bench/overhead/thin_proxy.py`` in front of it (FastAPI,
  one shared aiohttp session, stock uvicorn), the baseline;
- **tollway**: ``tollway serve`` as configured by default (metering on, its
  ledger in the Redis), no tracing;
- **tollway, metering off**: the same with ``metering: {enabled: false}``.

Scenarios: throughput at 16 connections (wrk ``-t1 -c16``), latency at 1
connection (p50/p99), and throughput streamed (secondary). Every request has a
unique prompt (``bench/lib/unique.lua``). It prints the table, a verdict on
each target (tollway's requests/s at 16 connections >= 0.6x the thin
proxy's; tollway's p50 at 1 connection at most 0.75 ms above the direct
path's) and metering on vs off (requests/s and CPU per request: a figure, not
a target). Unless ``--no-record``, the run replaces the ``overhead`` section
of ``bench/RESULTS.md``. ``--profile`` adds a py-spy run against tollway. See
``bench/overhead/README.md``.

    .venv/bin/python bench/overhead/run.py [--duration 10] [--connections 16]
        [--repeats 3] [--no-record] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import HOST, BenchError
from bench.lib.cpu import load_average
from bench.lib.entry import add_load_arguments, add_profile_arguments, clean_env, run_benchmark
from bench.lib.measure import measure
from bench.lib.net import free_port, wait_ready
from bench.lib.procs import Proc, Procs, check_pinned, pinned
from bench.lib.profile import ensure_pyspy, profile_gateway, summarise_profile
from bench.lib.redis_server import redis_version, start_redis
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
from bench.overhead.summary import (
    DIRECT,
    LABELS,
    PATHS,
    THIN,
    TOLLWAY,
    TOLLWAY_OFF,
    Run,
    Scenario,
    bottleneck_note,
    metering_table,
    per_run_lines,
    progress_line,
    summarise,
    table,
    verdict_table,
    verdicts,
)

API_KEY = "sk-tollway-bench-overhead"
COST_HEADER = "x-tollway-cost-usd"  # on every metered answer, never on an unmetered one
THIN_PROXY = Path(__file__).resolve().parent / "thin_proxy.py"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_load_arguments(
        parser,
        repeats=3,
        repeats_help="rounds: each runs every scenario on every path",
        load_help="wrk, the simulator and Redis",
        gateway_help="the thin proxy and both tollway gateways (one loaded at a time)",
    )
    add_profile_arguments(parser)
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming scenario")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds a proxy's CPU window stays open after wrk stops, so work a run leaves "
        "behind (the ledger's batched writes, every 1 s by default) is charged to it",
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeats < 1 or args.connections < 1 or args.settle < 0:
        parser.error("--duration, --repeats and --connections must be at least 1, --settle >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("overhead", parse_args(argv), execute)


def start_thin_proxy(procs: Procs, tmp: Path, cpu: int, upstream: Server) -> Server:
    """``thin_proxy.py`` on ``cpu``, in front of ``upstream``; returns once it is started."""
    port = free_port()
    proc = procs.start(
        "thin-proxy",
        pinned(cpu, [
            sys.executable, str(THIN_PROXY), "--host", HOST, "--port", str(port),
            "--upstream", upstream.base,
        ]),
        tmp / "thin-proxy.log",
        env=clean_env(),
    )  # fmt: skip
    return Server(proc, port)


def start_stack(
    args: argparse.Namespace, procs: Procs, tmp: Path
) -> tuple[Server, dict[str, Server], Proc]:
    """The simulator, the thin proxy and both gateways, ready and checked: ``(sim, proxies by
    path, redis)``."""
    redis = start_redis(procs, tmp, args.load_cpu)
    sim = start_sim(procs, tmp, args.load_cpu)
    keys = [{"key": API_KEY, "tenant": "bench"}]
    configs: dict[str, dict[str, Any]] = {
        TOLLWAY: gateway_config(sim, keys, redis={"url": redis.url}),
        TOLLWAY_OFF: gateway_config(
            sim, keys, redis={"url": redis.url}, metering={"enabled": False}
        ),
    }
    proxies = {THIN: start_thin_proxy(procs, tmp, args.gateway_cpu, sim)}
    for path, config in configs.items():
        proxies[path] = start_gateway(
            procs, tmp, args.gateway_cpu, config, name=path, env=clean_env()
        )
    wait_sim(sim, args.load_cpu)
    wait_ready(proxies[THIN].proc, f"{proxies[THIN].base}/", expect=404)  # one route only
    check_pinned(proxies[THIN].proc, args.gateway_cpu)
    for path in configs:
        wait_gateway(proxies[path], args.gateway_cpu)
    sanity_check(LABELS[DIRECT], sim.chat_url, API_KEY, gateway=False)
    sanity_check(LABELS[THIN], proxies[THIN].chat_url, API_KEY, gateway=False)
    for path in configs:
        headers = sanity_check(LABELS[path], proxies[path].chat_url, API_KEY, gateway=True)
        metered = path == TOLLWAY
        if (COST_HEADER in headers) != metered:
            raise BenchError(
                f"{LABELS[path]} answered {'without' if metered else 'with'} {COST_HEADER}: "
                f"metering is not {'on' if metered else 'off'}"
            )
    return sim, proxies, redis.proc


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    wrk = Wrk(ensure_wrk(), args.load_cpu, MODEL, args.max_tokens)
    if args.profile:
        ensure_pyspy()
    sim, proxies, redis = start_stack(args, procs, tmp)
    urls = {DIRECT: sim.chat_url, **{path: proxy.chat_url for path, proxy in proxies.items()}}
    logs: dict[str, tuple[Proc, ...]] = {DIRECT: (sim.proc,)}
    logs |= {path: (proxy.proc, sim.proc) for path, proxy in proxies.items()}
    scenarios = [
        Scenario("throughput", f"{args.connections} conns", args.connections, False),
        Scenario("latency", "1 conn", 1, False),
    ]
    if not args.no_stream:
        scenarios.append(
            Scenario("stream", f"{args.connections} conns, stream", args.connections, True)
        )
    print(
        "on cpu "
        f"{args.gateway_cpu}: "
        + ", ".join(f"{LABELS[p]} pid {proxy.proc.pid}" for p, proxy in proxies.items())
        + f"; on cpu {args.load_cpu}: simulator pid {sim.proc.pid}, redis-server pid "
        f"{redis.pid} and wrk; load average {load_before}",
        flush=True,
    )
    print(f"warming up ({args.warmup:.0f} s per path) ...", flush=True)
    for path in PATHS:
        wrk.run(urls[path], API_KEY, args.connections, args.warmup, logs=logs[path])
    print(
        f"measuring: {args.repeats} rounds, {args.duration:.0f} s per scenario and path",
        flush=True,
    )
    runs: list[Run] = []
    for repeat in range(args.repeats):
        order = PATHS if repeat % 2 == 0 else PATHS[::-1]  # drift hits every path alike
        for scenario in scenarios:
            for path in order:
                proxy = proxies[path].proc if path in proxies else None
                sample = measure(
                    wrk, urls[path], API_KEY, scenario.connections, args.duration,
                    gateway=proxy or sim.proc, upstream=sim.proc, stream=scenario.stream,
                    cores=(args.gateway_cpu, args.load_cpu),
                    settle_s=args.settle if proxy else 0.0,
                )  # fmt: skip
                run = Run(
                    scenario=scenario,
                    path=path,
                    requests=sample.stats.requests,
                    duration_s=sample.stats.duration_s,
                    p50_us=sample.stats.p50_us,
                    p99_us=sample.stats.p99_us,
                    proxy_cpu_s=sample.gateway_cpu_s if proxy else None,
                    proxy_run_cpu_s=sample.gateway_run_cpu_s if proxy else None,
                    upstream_cpu_s=sample.upstream_cpu_s,
                    proxy_core_busy=sample.core_busy[args.gateway_cpu],
                    load_core_busy=sample.core_busy[args.load_cpu],
                )
                runs.append(run)
                print(progress_line(run, args.gateway_cpu, args.load_cpu), flush=True)
    profile_text = profile(args, procs, tmp, wrk, proxies[TOLLWAY], sim) if args.profile else None
    load_after = load_average()
    rows = summarise(runs, scenarios)
    parts = [table(rows), "Targets:", verdict_table(verdicts(rows, args.connections))]
    metering = metering_table(rows, args.connections)
    if metering:
        parts += ["Metering on vs off (a figure, not a target):", metering]
    notes = [
        f"load average (1/5/15 min): {load_before} before, {load_after} after",
        f"medians of {args.repeats} round{'s' if args.repeats > 1 else ''} of "
        f"{args.duration} s per scenario and path, the "
        "paths taking turns (reversed every other round); unique prompts; "
        f"max_tokens {args.max_tokens}; upstream = `tollway sim --zero-delay`; tollway's "
        f"Redis = a redis-server on cpu {args.load_cpu}; no tracing (no `OTEL_*` variables)",
        "added p50/p99: the path's median minus the direct path's; proxy CPU: the process "
        f"between wrk and the upstream, utime + stime over the run plus {args.settle:g} s, "
        "per request",
        "metering on vs off is a figure, not a target: (on - off) / off of the "
        f"{args.connections}-connection medians",
    ]
    for path in (THIN, TOLLWAY):
        note = bottleneck_note(runs, path, args.connections, args.gateway_cpu, args.load_cpu)
        if note:
            notes.append(note)
    publish(
        result="\n\n".join(parts),
        notes=notes,
        head=section_head(
            "overhead",
            "tollway against the thinnest FastAPI + aiohttp proxy and the upstream called "
            "directly, one core each; metering on vs off.",
            started,
            command,
            [redis_version()],
        ),
        pinning=f"thin proxy and both tollway gateways on cpu {args.gateway_cpu} (one loaded "
        f"at a time); wrk, simulator and Redis on cpu {args.load_cpu}",
        runs_detail=per_run_lines(runs),
        profile_text=profile_text,
        no_record=args.no_record,
    )


def profile(
    args: argparse.Namespace, procs: Procs, tmp: Path, wrk: Wrk, gateway: Server, sim: Server
) -> str:
    """One more throughput run against tollway (metering on) under py-spy; its summary."""
    _, raw, title = profile_gateway(
        args, procs, tmp, wrk, gateway, sim, API_KEY,
        connections=args.connections, duration=args.duration,
    )  # fmt: skip
    return f"profiled run of tollway {title}\n" + summarise_profile(raw, args.profile_top)


if __name__ == "__main__":
    sys.exit(main())
