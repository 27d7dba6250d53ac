"""The gateway's own cost: tollway vs the same upstream called directly, in one run.

Pins the gateway to one core and the load generator (wrk) plus the upstream
(the simulator with ``--zero-delay``) to the other, then measures, alternating
direct and gateway runs:

- throughput at 16 connections (wrk ``-t1 -c16``), non-streaming;
- latency at 1 connection (p50/p99), non-streaming, and the latency the
  gateway adds over the direct path;
- throughput at 16 connections, streaming (secondary);
- the gateway's CPU time per request (utime+stime from /proc/PID/stat).

Every request has a unique prompt (see ``bench/lib/unique.lua``). Prints a
Markdown table and, unless ``--no-record``, appends it to ``bench/RESULTS.md``
with the date, command, commit and machine. ``--profile`` adds a py-spy run
against the gateway and prints where its CPU time goes. See
``bench/overhead/README.md``.

    .venv/bin/python bench/overhead/run.py [--duration 10] [--connections 16]
        [--repeats 2] [--no-record] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib.cpu import load_average
from bench.lib.entry import add_load_arguments, add_profile_arguments, run_benchmark
from bench.lib.measure import measure
from bench.lib.procs import Procs
from bench.lib.profile import ensure_pyspy, summarise_profile, under_pyspy
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
    TARGETS,
    Run,
    Scenario,
    bottleneck_note,
    per_run_lines,
    progress_line,
    summarise,
    table,
)

API_KEY = "sk-tollway-bench-overhead"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_load_arguments(
        parser,
        repeats=2,
        repeats_help="runs per scenario and path",
        load_help="wrk and the simulator",
    )
    add_profile_arguments(parser)
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming row")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeats < 1 or args.connections < 1:
        parser.error("--duration, --repeats and --connections must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("overhead", parse_args(argv), execute)


def start_stack(args: argparse.Namespace, procs: Procs, tmp: Path) -> tuple[Server, Server]:
    sim = start_sim(procs, tmp, args.load_cpu)
    config = gateway_config(sim, [{"key": API_KEY, "tenant": "bench"}])
    gateway = start_gateway(procs, tmp, args.gateway_cpu, config)
    wait_sim(sim, args.load_cpu)
    wait_gateway(gateway, args.gateway_cpu)
    sanity_check("direct", sim.chat_url, API_KEY, gateway=False)
    sanity_check("gateway", gateway.chat_url, API_KEY, gateway=True)
    return sim, gateway


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    wrk = Wrk(ensure_wrk(), args.load_cpu, MODEL, args.max_tokens)
    if args.profile:
        ensure_pyspy()
    sim, gateway = start_stack(args, procs, tmp)
    urls = {"direct": sim.chat_url, "gateway": gateway.chat_url}
    logs = (gateway.proc, sim.proc)
    scenarios = [
        Scenario("throughput", f"{args.connections} conns", args.connections, False),
        Scenario("latency", "1 conn", 1, False),
    ]
    if not args.no_stream:
        scenarios.append(
            Scenario("stream", f"{args.connections} conns, stream", args.connections, True)
        )
    print(
        f"gateway pid {gateway.proc.pid} on cpu {args.gateway_cpu}; simulator pid "
        f"{sim.proc.pid} and wrk on cpu {args.load_cpu}; load average {load_before}",
        flush=True,
    )
    print(f"warming up ({args.warmup:.0f} s per path) ...", flush=True)
    for target in TARGETS:
        wrk.run(urls[target], API_KEY, args.connections, args.warmup, logs=logs)
    print(f"measuring: {args.repeats} x {args.duration:.0f} s per scenario and path", flush=True)
    runs: list[Run] = []
    for _ in range(args.repeats):
        for scenario in scenarios:
            for target in TARGETS:
                sample = measure(
                    wrk, urls[target], API_KEY, scenario.connections, args.duration,
                    gateway=gateway.proc, upstream=sim.proc, stream=scenario.stream,
                    cores=(args.gateway_cpu, args.load_cpu),
                )  # fmt: skip
                run = Run(
                    scenario=scenario,
                    target=target,
                    requests=sample.stats.requests,
                    duration_s=sample.stats.duration_s,
                    p50_us=sample.stats.p50_us,
                    p99_us=sample.stats.p99_us,
                    gateway_cpu_s=sample.gateway_cpu_s if target == "gateway" else None,
                    upstream_cpu_s=sample.upstream_cpu_s,
                    gateway_core_busy=sample.core_busy[args.gateway_cpu],
                    load_core_busy=sample.core_busy[args.load_cpu],
                )
                runs.append(run)
                print(progress_line(run, args.gateway_cpu, args.load_cpu), flush=True)
    profile_text = None
    if args.profile:
        stats, raw = under_pyspy(
            procs, tmp, gateway.proc.pid, args.load_cpu,
            lambda: wrk.run(urls["gateway"], API_KEY, args.connections, args.duration, logs=logs),
            rate=args.profile_rate, native=args.profile_native,
        )  # fmt: skip
        profile_text = (
            f"profiled run ({args.connections} conns, {args.duration} s, gateway under py-spy "
            f"at {args.profile_rate} Hz{', native' if args.profile_native else ''}, so slower "
            f"than unprofiled): {stats.rps:.0f} req/s\n" + summarise_profile(raw, args.profile_top)
        )
    load_after = load_average()
    result = table(summarise(runs, scenarios))
    notes = [
        f"load average (1/5/15 min): {load_before} before, {load_after} after",
        "medians of "
        f"{args.repeats} alternating runs of {args.duration} s; unique prompts; "
        f"max_tokens {args.max_tokens}; upstream = `tollway sim --zero-delay`",
    ]
    bottleneck = bottleneck_note(runs, args.connections, args.gateway_cpu, args.load_cpu)
    if bottleneck:
        notes.append(bottleneck)
    publish(
        result=result,
        notes=notes,
        head=section_head("overhead (gateway vs direct)", started, command),
        pinning=f"gateway on cpu {args.gateway_cpu}; wrk and simulator on cpu {args.load_cpu}",
        runs_detail=per_run_lines(runs),
        profile_text=profile_text,
        no_record=args.no_record,
    )


if __name__ == "__main__":
    sys.exit(main())
