"""Cache-hit throughput and latency of the gateway on one core, with a real Redis.

Starts a real ``redis-server``, the simulator with ``--zero-delay`` (both on
the load core, with wrk) and one gateway on the gateway core whose config
points at that Redis and whose tier caches deterministic requests
(``cache: deterministic``). It warms the cache with one request, checks that
a second identical request answers ``x-tollway-cache: hit`` (and the same
completion), then runs wrk with ``bench/lib/unique.lua`` in its ``same`` mode: the SAME
deterministic body every time (``temperature: 0``, small ``max_tokens``, the
API key), so every request is a cache hit. It measures, alternating with the
simulator called directly (for reference; ``--no-direct`` skips it):

- throughput at 16 connections (wrk ``-t1 -c16``);
- latency at 1 connection (p50/p99);
- the gateway's CPU time per request (utime+stime from /proc/PID/stat), and
  Redis's.

Around every gateway run it reads the simulator's ``/sim/stats``: if the
upstream received any request while the gateway was under load, the load was
not served from the cache and the run fails. Prints a Markdown table with the
targets (>= 4,000 requests/s at 16 connections, p50 <= 0.4 ms at 1
connection) and, unless ``--no-record``, makes it the ``cachehit`` section of
``bench/RESULTS.md`` with the date, command, commit and machine. ``--profile`` adds a py-spy run
against the gateway. See ``bench/cachehit/README.md``.

    .venv/bin/python bench/cachehit/run.py [--duration 10] [--repeats 2]
        [--no-record] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.cachehit.summary import (
    PATHS,
    Run,
    Scenario,
    bottleneck_note,
    missed,
    per_run_lines,
    progress_line,
    quiet_note,
    summarise,
    table,
)
from bench.lib import BenchError
from bench.lib.cpu import cpu_seconds, load_average
from bench.lib.entry import add_load_arguments, add_profile_arguments, clean_env, run_benchmark
from bench.lib.measure import measure
from bench.lib.net import http
from bench.lib.procs import Procs
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
from bench.lib.wrk import Wrk, WrkStats, ensure_wrk

API_KEY = "sk-tollway-bench-cachehit"
TENANT = "bench-cachehit"
PROMPT = "cachehit: how much does this toll road cost?"  # SAME_PROMPT in bench/lib/unique.lua
CACHE_HEADER = "x-tollway-cache"
STORE_WAIT_S = 0.2  # the answer is stored by a background task after the response is sent

T = TypeVar("T")


def cache_body(max_tokens: int) -> dict[str, Any]:
    """The one request of this benchmark, field for field what ``unique.lua`` sends in
    its ``same`` mode."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,  # an int, as in unique.lua's same mode: 0.0 would be another cache key
        "stream": False,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_load_arguments(
        parser,
        repeats=2,
        repeats_help="runs per scenario and path",
        load_help="wrk, the simulator and Redis",
    )
    add_profile_arguments(parser)
    parser.add_argument(
        "--no-direct", action="store_true", help="skip the direct-to-simulator reference runs"
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeats < 1 or args.connections < 1 or args.max_tokens < 1:
        parser.error("--duration, --repeats, --connections and --max-tokens must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("cachehit", parse_args(argv), execute)


def start_stack(
    args: argparse.Namespace, procs: Procs, tmp: Path
) -> tuple[RedisServer, Server, Server]:
    redis = start_redis(procs, tmp, args.load_cpu)
    sim = start_sim(procs, tmp, args.load_cpu)
    config = gateway_config(sim, [{"key": API_KEY, "tenant": TENANT}], redis={"url": redis.url})
    config["tiers"][0]["cache"] = "deterministic"  # the default, spelled out
    gateway = start_gateway(procs, tmp, args.gateway_cpu, config, env=clean_env())
    wait_sim(sim, args.load_cpu)
    wait_gateway(gateway, args.gateway_cpu)
    sanity_check("direct", sim.chat_url, API_KEY, gateway=False)
    sanity_check("gateway", gateway.chat_url, API_KEY, gateway=True)
    return redis, sim, gateway


def upstream_received(sim: Server) -> int:
    """Chat and text completions the simulator has received since it started."""
    status, _, data = http("GET", f"{sim.base}/sim/stats")
    if status != 200:
        raise BenchError(f"the simulator's /sim/stats answered {status}: {data[:300]!r}")
    total: int = json.loads(data)["requests_received_total"]
    return total


def warm_cache(gateway: Server, body: dict[str, Any]) -> None:
    """One request stores the answer; a second identical one must be a hit with the same answer."""

    def post(which: str) -> tuple[str | None, dict[str, Any]]:
        status, headers, data = http("POST", gateway.chat_url, body, key=API_KEY)
        if status != 200:
            raise BenchError(
                f"the {which} cache request answered {status}: {data[:500]!r}\n"
                f"gateway log:\n{gateway.proc.log_tail()}"
            )
        completion: dict[str, Any] = json.loads(data)
        return headers.get(CACHE_HEADER), completion

    first, stored = post("first")
    if first != "miss":
        raise BenchError(
            f"the first cache request answered {CACHE_HEADER}: {first!r}, expected 'miss' "
            "(a fresh Redis, a deterministic request, a tier with cache: deterministic); "
            f"request {json.dumps(body)}\ngateway log:\n{gateway.proc.log_tail()}"
        )
    time.sleep(STORE_WAIT_S)
    second, replayed = post("second")
    if second != "hit":
        raise BenchError(
            f"a second identical request answered {CACHE_HEADER}: {second!r}, not 'hit': "
            "the gateway did not serve it from the cache (is Redis reachable? see the log)\n"
            f"gateway log:\n{gateway.proc.log_tail()}"
        )
    if replayed.get("choices") != stored.get("choices"):
        raise BenchError(
            f"the cache hit's choices differ from the stored answer's:\n{replayed}\n{stored}"
        )


def check_from_cache(what: str, went: int, answered: int) -> None:
    """Fails if the simulator received requests while the gateway was under cache-hit load."""
    if went:
        raise BenchError(
            f"{what}: the simulator received {went} requests while the gateway answered "
            f"{answered:,}: not every request was served from the cache (a Redis call over "
            "its budget is a miss; or unique.lua's same-mode body differs from cache_body()), "
            "so the "
            "figures would not be cache-hit figures"
        )


def from_cache(sim: Server, what: str, load: Callable[[], T], answered: Callable[[T], int]) -> T:
    """``load()`` against the gateway, checked with ``check_from_cache``."""
    before = upstream_received(sim)
    result = load()
    check_from_cache(what, upstream_received(sim) - before, answered(result))
    return result


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    wrk = Wrk(ensure_wrk(), args.load_cpu, MODEL, args.max_tokens, same_body=True)
    if args.profile:
        ensure_pyspy()
    redis, sim, gateway = start_stack(args, procs, tmp)
    urls = {"direct": sim.chat_url, "gateway": gateway.chat_url}
    logs = (gateway.proc, sim.proc, redis.proc)
    paths = ("gateway",) if args.no_direct else PATHS
    print(
        f"gateway pid {gateway.proc.pid} on cpu {args.gateway_cpu}; simulator pid "
        f"{sim.proc.pid}, redis-server pid {redis.proc.pid} and wrk on cpu {args.load_cpu}; "
        f"load average {load_before}",
        flush=True,
    )
    warm_cache(gateway, cache_body(args.max_tokens))
    upstream_after_warm = upstream_received(sim)
    print(
        f"cache warmed: a second identical request answered {CACHE_HEADER}: hit "
        f"(the simulator has received {upstream_after_warm} requests: sanity checks + warm-up)",
        flush=True,
    )

    def load_run(path: str, connections: int, duration: float) -> WrkStats:
        return wrk.run(urls[path], API_KEY, connections, duration, logs=logs)

    print(f"warming up ({args.warmup:.0f} s per path) ...", flush=True)
    gateway_requests = 0
    for path in paths:
        if path == "gateway":
            stats = from_cache(
                sim,
                "warm-up",
                lambda: load_run("gateway", args.connections, args.warmup),
                lambda s: s.requests,
            )
            gateway_requests += stats.requests
        else:
            load_run(path, args.connections, args.warmup)
    scenarios = [
        Scenario("throughput", f"{args.connections} conns", args.connections),
        Scenario("latency", "1 conn", 1),
    ]
    print(f"measuring: {args.repeats} x {args.duration:.0f} s per scenario and path", flush=True)
    runs: list[Run] = []
    for _ in range(args.repeats):
        for scenario in scenarios:
            for path in paths:
                redis_before = cpu_seconds(redis.proc.pid)
                up_before = upstream_received(sim)
                sample = measure(
                    wrk, urls[path], API_KEY, scenario.connections, args.duration,
                    gateway=gateway.proc, upstream=sim.proc,
                    cores=(args.gateway_cpu, args.load_cpu),
                )  # fmt: skip
                went = upstream_received(sim) - up_before
                run = Run(scenario, path, sample, cpu_seconds(redis.proc.pid) - redis_before, went)
                runs.append(run)
                print(progress_line(run, args.gateway_cpu, args.load_cpu), flush=True)
                if path == "gateway":
                    gateway_requests += sample.stats.requests
                    check_from_cache(scenario.label, went, sample.stats.requests)
    profile_text = None
    if args.profile:
        stats, raw = from_cache(
            sim,
            "profiled run",
            lambda: under_pyspy(
                procs, tmp, gateway.proc.pid, args.load_cpu,
                lambda: load_run("gateway", args.connections, args.duration),
                rate=args.profile_rate, native=args.profile_native,
            ),
            lambda result: result[0].requests,
        )  # fmt: skip
        gateway_requests += stats.requests
        profile_text = (
            f"profiled run ({args.connections} conns, {args.duration} s, cache hits, gateway "
            f"under py-spy at {args.profile_rate} Hz{', native' if args.profile_native else ''}"
            f", so slower than unprofiled): {stats.rps:.0f} req/s\n"
            + summarise_profile(raw, args.profile_top)
        )
    load_after = load_average()
    rows = summarise(runs, scenarios)
    result = table(rows)
    not_met = missed(rows)
    notes = [
        f"load average (1/5/15 min): {load_before} before, {load_after} after",
        f"medians of {args.repeats} runs of {args.duration} s per scenario and path"
        + ("" if args.no_direct else ", direct and gateway alternating")
        + "; every request the same deterministic body (`temperature: 0`, max_tokens "
        f"{args.max_tokens}, `bench/lib/unique.lua` in its `same` mode), non-streaming; upstream = "
        "`tollway sim --zero-delay`; the gateway's Redis = the redis-server on "
        f"cpu {args.load_cpu}; metering on (the default), no tracing",
        f"served from the cache: before the load a second identical request answered "
        f"`{CACHE_HEADER}: hit`; the simulator received {upstream_after_warm} requests before "
        "the load (the sanity checks, direct and through the gateway, and the one cache "
        "miss) and none while the gateway "
        f"answered {gateway_requests:,} requests (warm-up, measured"
        + (", profiled" if args.profile else "")
        + " runs)",
        "targets: " + ("all met" if not not_met else "NOT met: " + "; ".join(not_met)),
    ]
    bottleneck = bottleneck_note(runs, args.connections, args.gateway_cpu, args.load_cpu)
    if bottleneck:
        notes.append(bottleneck)
    quiet = quiet_note(runs, args.gateway_cpu)
    if quiet:
        notes.append(quiet)
    publish(
        result=result,
        notes=notes,
        head=section_head(
            "cachehit",
            "Requests answered from tollway's response cache (a real Redis) on one gateway "
            "core, with the upstream called directly for reference.",
            started,
            command,
            [redis_version()],
        ),
        pinning=f"gateway on cpu {args.gateway_cpu}; "
        f"wrk, simulator and Redis on cpu {args.load_cpu}",
        runs_detail=per_run_lines(runs, args.gateway_cpu, args.load_cpu),
        profile_text=profile_text,
        no_record=args.no_record,
    )


if __name__ == "__main__":
    sys.exit(main())
