"""Metering's own CPU cost: the gateway with metering, spans and ledger on vs off, in one run.

Starts a real ``redis-server``, a null OTLP/HTTP collector, the simulator with
``--zero-delay`` (all on the load core, with wrk) and two gateways on the
gateway core:

- **on**: metering enabled (the default), its ledger in that Redis, spans
  exported over OTLP/HTTP to the collector (``OTEL_EXPORTER_OTLP_ENDPOINT``),
  Prometheus counting;
- **off**: ``metering: {enabled: false}``, no ``OTEL_*`` variables, the same
  Redis URL (unused).

The same 16-connection non-streaming wrk load (unique prompts) goes to each,
``--repeats`` rounds: in mode ``together`` (the default) both gateways are
loaded at the same time, each by its own wrk, so host noise hits both alike;
in mode ``alternate`` one after the other (on-off, off-on, ...). The result is
the gateway's CPU time per request (utime+stime from /proc/PID/stat) and
requests/s, medians, and metering's cost, the median of the rounds'
(on - off) / off, against the target (<= 10%). Afterwards it checks
that "on" really metered (Prometheus, ledger, spans received) and "off" did
not. Prints a Markdown table and, unless ``--no-record``, appends it to
``bench/RESULTS.md``. See ``bench/metering/README.md``.

    .venv/bin/python bench/metering/run.py [--mode together|alternate] [--duration S]
        [--repeats N] [--stream] [--max-tokens N] [--no-record]
        [--profile [--profile-side on|off|both] [--profile-native]]

The target is judged only on the default load (whole answers of 16 tokens): with
``--stream`` or another ``--max-tokens`` the figures are recorded without a verdict.

``--profile`` adds a py-spy run per profiled side after the timed runs (its
throughput is not used in the table) and puts each summary in the record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import BenchError
from bench.lib.cpu import load_average
from bench.lib.entry import (
    add_fresh_every_argument,
    add_load_arguments,
    add_profile_arguments,
    run_benchmark,
)
from bench.lib.measure import Target, load_together, measure, measure_together
from bench.lib.otlp_sink import Sink, start_sink
from bench.lib.procs import Procs, run_quiet
from bench.lib.profile import ensure_pyspy, summarise_profile, under_pyspy
from bench.lib.redis_server import start_redis
from bench.lib.report import publish, section_head
from bench.lib.stack import (
    MODEL,
    Server,
    sanity_check,
    start_gateway,
    start_sim,
    wait_gateway,
    wait_sim,
)
from bench.lib.wrk import Wrk, ensure_wrk
from bench.metering.checks import check_metered, check_spans
from bench.metering.sides import side
from bench.metering.summary import (
    MODES,
    SIDES,
    Run,
    contention_note,
    cost_note,
    mode_note,
    per_run_lines,
    progress_line,
    round_line,
    table,
)
from metering.span_export import DEFAULT_SAMPLE_RATIO

KEYS = {"on": "sk-tollway-bench-metering-on", "off": "sk-tollway-bench-metering-off"}
TENANTS = {"on": "bench-on", "off": "bench-off"}
COST_HEADER = "x-tollway-cost-usd"
DEFAULTS = {"together": (5, 6), "alternate": (3, 10)}  # mode: (--repeats, --duration)
TARGET_MAX_TOKENS = 16  # the target's load: whole answers of this many tokens


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_load_arguments(
        parser,
        repeats=0,  # set by --mode below
        repeats_help="rounds (a run of each side per round); default by --mode",
        load_help="wrk, simulator, Redis and the collector",
        gateway_help="both gateways",
    )
    parser.set_defaults(repeats=None, duration=None)
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="together",
        help="together: each round loads both gateways at once on the gateway core (default "
        "5 rounds x 6 s); alternate: one side after the other, on-off, off-on, ... (default "
        "3 x 10 s per side); --repeats and --duration override either",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=6.0,
        help="seconds the CPU window stays open after each run, so the last span batch "
        "(the SDK exports every 5 s) and ledger writes count",
    )
    add_fresh_every_argument(parser)
    parser.add_argument(
        "--span-sampling",
        type=float,
        default=None,
        help="fraction of requests traced by the 'on' gateway (sets OTEL_TRACES_SAMPLER="
        "parentbased_traceidratio and its ARG); default: the gateway's own default "
        f"({DEFAULT_SAMPLE_RATIO:g}); metrics and ledger always see every request",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="streamed answers (stream: true) instead of whole ones; the target is stated for "
        "the default load (whole answers of --max-tokens 16), the harshest for the ratio",
    )
    add_profile_arguments(parser)
    parser.add_argument(
        "--profile-side",
        choices=("on", "off", "both"),
        default="on",
        help="which gateway --profile samples",
    )
    parser.add_argument(
        "--profile-raw-dir",
        type=Path,
        default=None,
        help="also keep py-spy's raw collapsed stacks there (pyspy-on.raw, pyspy-off.raw)",
    )
    args = parser.parse_args(argv)
    repeats, duration = DEFAULTS[args.mode]
    args.repeats = repeats if args.repeats is None else args.repeats
    args.duration = duration if args.duration is None else args.duration
    if args.span_sampling is not None and not 0 < args.span_sampling <= 1:
        parser.error("--span-sampling must be in (0, 1]")
    if args.duration < 1 or args.repeats < 1 or args.connections < 1 or args.settle < 0:
        parser.error("--duration, --repeats and --connections must be at least 1, --settle >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("metering", parse_args(argv), execute)


Sides = dict[str, tuple[dict[str, Any], dict[str, str]]]  # side: (config, env)


def start_stack(args: argparse.Namespace, procs: Procs, tmp: Path) -> tuple[Server, Sink, Sides]:
    """Redis, the collector and the simulator; and each gateway's configuration."""
    redis = start_redis(procs, tmp, args.load_cpu)
    sink = start_sink(procs, tmp, args.load_cpu)
    sim = start_sim(procs, tmp, args.load_cpu)
    keys: list[dict[str, Any]] = [
        {"key": KEYS["on"], "tenant": TENANTS["on"], "admin": True},  # reads /v1/usage
        {"key": KEYS["off"], "tenant": TENANTS["off"]},
    ]
    sides = {
        name: side(
            sim, keys, redis.url, sink.base, metered=name == "on", sampling=args.span_sampling
        )
        for name in SIDES
    }
    wait_sim(sim, args.load_cpu)
    return sim, sink, sides


def start_gateways(
    args: argparse.Namespace, procs: Procs, tmp: Path, sides: Sides
) -> dict[str, Server]:
    """Both gateways, new processes, ready and checked: "on" meters, "off" does not."""
    gateways = {
        name: start_gateway(procs, tmp, args.gateway_cpu, config, name=f"gateway-{name}", env=env)
        for name, (config, env) in sides.items()
    }
    for name in SIDES:
        wait_gateway(gateways[name], args.gateway_cpu)
        headers = sanity_check(f"gateway-{name}", gateways[name].chat_url, KEYS[name], gateway=True)
        if (COST_HEADER in headers) != (name == "on"):
            have = "has" if COST_HEADER in headers else "lacks"
            raise BenchError(f"gateway-{name}'s answer {have} {COST_HEADER}: metering isn't {name}")
    return gateways


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    wrk = Wrk(ensure_wrk(), args.load_cpu, MODEL, args.max_tokens)
    if args.profile:
        ensure_pyspy()
    sim, sink, sides = start_stack(args, procs, tmp)
    print(
        f"gateways on cpu {args.gateway_cpu}, both started anew every {args.fresh_every} "
        f"round(s); simulator, Redis, OTLP collector and wrk on cpu {args.load_cpu}; load "
        f"average {load_before}",
        flush=True,
    )
    print(
        f"measuring ({args.mode}): {args.repeats} rounds x {args.duration:.0f} s "
        f"(+ {args.settle:g} s settle), {args.connections} connections per gateway",
        flush=True,
    )
    runs: list[Run] = []
    gateways: dict[str, Server] = {}
    for repeat in range(args.repeats):
        if repeat % args.fresh_every == 0:  # new processes: each one's own luck averages out
            for gateway in gateways.values():
                procs.stop(gateway.proc)  # a graceful stop: its last spans are exported
            gateways = start_gateways(args, procs, tmp, sides)
            warm_up(args, wrk, gateways, sim)
        runs += measure_round(args, wrk, gateways, sim, repeat)
        for run in runs[-len(SIDES) :]:
            print(progress_line(run, args.repeats, args.gateway_cpu, args.load_cpu), flush=True)
        print(round_line(runs, repeat), flush=True)
    profile_text = profile(args, procs, tmp, wrk, gateways, sim) if args.profile else None
    metered = check_metered(
        gateways["on"], gateways["off"], KEYS["on"], (TENANTS["on"], TENANTS["off"]), started
    )
    procs.stop(gateways["on"].proc)  # a graceful stop flushes the last spans
    spans = sink.stats()
    check_spans(spans)
    notes = [
        f"load average (1/5/15 min): {load_before} before, {load_average()} after",
        *run_notes(args, runs),
        f"the on gateway metered: Prometheus counted {metered.prometheus_requests:,} requests "
        f"(its last process), the ledger {metered.ledger_requests:,} (tenant {TENANTS['on']}, "
        f"every process), the collector received {spans['spans']:,} spans in "
        f"{spans['exports']:,} exports ({spans['spans'] / metered.ledger_requests:.3f} per "
        "request); the off gateway: none of these",
        contention_note(runs, args.gateway_cpu, args.mode),
    ]
    failure = metered.failure_note()
    if failure:
        notes.append(failure)
    publish(
        result=table(runs, args.gateway_cpu, judged=target_load(args)),
        notes=notes,
        head=section_head("metering (on vs off)", started, command, [redis_version()]),
        pinning=f"both gateways on cpu {args.gateway_cpu}; wrk, simulator, Redis and the OTLP "
        f"collector on cpu {args.load_cpu}",
        runs_detail=per_run_lines(runs, args.gateway_cpu, args.load_cpu),
        profile_text=profile_text,
        no_record=args.no_record,
    )


def warm_up(args: argparse.Namespace, wrk: Wrk, gateways: dict[str, Server], sim: Server) -> None:
    """Each side's code paths warm, under the load the timed rounds will put on them."""
    if args.mode == "together":
        print(f"warming up ({args.warmup:.0f} s, both gateways at once) ...", flush=True)
        targets = [Target(gateways[n].chat_url, KEYS[n], gateways[n].proc) for n in SIDES]
        load_together(
            wrk, targets, args.connections, args.warmup, upstream=sim.proc, stream=args.stream
        )
        return
    print(f"warming up ({args.warmup:.0f} s per side) ...", flush=True)
    for name in SIDES:
        gw = gateways[name]
        wrk.run(
            gw.chat_url, KEYS[name], args.connections, args.warmup,
            stream=args.stream, logs=(gw.proc, sim.proc),
        )  # fmt: skip


def measure_round(
    args: argparse.Namespace, wrk: Wrk, gateways: dict[str, Server], sim: Server, repeat: int
) -> list[Run]:
    """One round: both sides at once (together) or one after the other (alternate)."""
    order = SIDES if repeat % 2 == 0 else SIDES[::-1]  # on off, off on, ...: cancels drift
    cores = (args.gateway_cpu, args.load_cpu)
    if args.mode == "together":  # the order only decides which wrk starts a moment first
        targets = [Target(gateways[n].chat_url, KEYS[n], gateways[n].proc) for n in order]
        samples = measure_together(
            wrk, targets, args.connections, args.duration,
            upstream=sim.proc, cores=cores, settle_s=args.settle, stream=args.stream,
        )  # fmt: skip
        return [Run(name, repeat, sample) for name, sample in zip(order, samples, strict=True)]
    runs = []
    for name in order:
        sample = measure(
            wrk, gateways[name].chat_url, KEYS[name], args.connections, args.duration,
            gateway=gateways[name].proc, upstream=sim.proc, cores=cores, settle_s=args.settle,
            stream=args.stream,
        )  # fmt: skip
        runs.append(Run(name, repeat, sample))
    return runs


def run_notes(args: argparse.Namespace, runs: list[Run]) -> list[str]:
    """How the rounds ran, with what sampling, and the headline with its spread."""
    sampling = (
        f"{args.span_sampling:g} (OTEL_TRACES_SAMPLER=parentbased_traceidratio)"
        if args.span_sampling is not None
        else f"the gateway's default, parentbased_traceidratio {DEFAULT_SAMPLE_RATIO:g}"
    )
    return [
        mode_note(args.mode, args.gateway_cpu),
        f"{args.repeats} rounds of {args.duration} s per side, both gateways started anew "
        f"every {args.fresh_every} round(s) (one process keeps its own luck, up to ~1.4%, "
        f"for its whole life); {args.connections} connections "
        f"per gateway, {'streaming' if args.stream else 'non-streaming'}, unique prompts, "
        f"max_tokens {args.max_tokens}; upstream = "
        f"`tollway sim --zero-delay`; each round's CPU window stays open {args.settle:g} s after "
        "wrk stops (span batches, ledger writes); the on/off rows are medians per side",
        f"span sampling of the on gateway: {sampling}",
        cost_note(runs, args.gateway_cpu, judged=target_load(args)),
    ]


def target_load(args: argparse.Namespace) -> bool:
    """Whether this run's load is the one the target is stated for: whole answers of
    16 tokens (the harshest for the ratio; longer or streamed answers dilute it)."""
    return not args.stream and args.max_tokens == TARGET_MAX_TOKENS


def profile(
    args: argparse.Namespace,
    procs: Procs,
    tmp: Path,
    wrk: Wrk,
    gateways: dict[str, Server],
    sim: Server,
) -> str:
    """py-spy each profiled side under the same load; their summaries, one after the other."""
    texts = []
    for name in SIDES if args.profile_side == "both" else (args.profile_side,):
        gw = gateways[name]
        stats, raw = under_pyspy(
            procs, tmp, gw.proc.pid, args.load_cpu,
            lambda gw=gw, name=name: wrk.run(  # type: ignore[misc]
                gw.chat_url, KEYS[name], args.connections, args.duration, logs=(gw.proc, sim.proc)
            ),
            rate=args.profile_rate, native=args.profile_native,
        )  # fmt: skip
        if args.profile_raw_dir is not None:
            args.profile_raw_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw, args.profile_raw_dir / f"pyspy-{name}.raw")
        texts.append(
            f"profiled run of '{name}' ({args.connections} conns, {args.duration} s, py-spy at "
            f"{args.profile_rate} Hz{', native' if args.profile_native else ''}, so slower "
            f"than unprofiled): {stats.rps:.0f} req/s\n" + summarise_profile(raw, args.profile_top)
        )
    return "\n\n".join(texts)


def redis_version() -> str:
    words = run_quiet(["redis-server", "--version"]).stdout.split()
    version = next((w.removeprefix("v=") for w in words if w.startswith("v=")), "unknown")
    return f"redis-server {version}"


if __name__ == "__main__":
    sys.exit(main())
