"""Overload: goodput and TTFT under 4x a tier's capacity, through tollway vs direct to the tier.

One simulator tier with model time (``--max-num-seqs 8``, requests of ~0.9 s,
streamed) and a gateway in front of it with admission (slots = max_num_seqs,
``scheduling.deadline_ms``). First the tier's capacity is measured with a
closed loop at exactly its slot count; then an open-loop Poisson load at
``--overload`` x that capacity runs against each path, alternating, with the
same arrival schedule for both. Reports per path: offered and completed
rates, goodput (ok requests whose TTFT met ``--slo-ms``), TTFT p50/p99,
429s and how fast they came back, errors, unfinished requests, the
simulator's peak waiting queue and the gateway's. Prints a Markdown table
and, unless ``--no-record``, makes it the ``overload`` section of
``bench/RESULTS.md``. See
``bench/overload/README.md``.

    .venv/bin/python bench/overload/run.py [--duration 20] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import BenchError
from bench.lib.cpu import busy_fraction, cpu_seconds, cpu_times, load_average
from bench.lib.entry import run_benchmark
from bench.lib.net import http
from bench.lib.procs import Procs, check_alive, check_pinned, pinned
from bench.lib.redis_server import start_redis
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
from bench.overload.records import LoadResult
from bench.overload.summary import (
    TARGETS,
    Capacity,
    Run,
    capacity,
    medians,
    run_line,
    run_stats,
    table,
)

API_KEY = "sk-tollway-bench-overload"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds of arrivals per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path, alternating")
    parser.add_argument("--overload", type=float, default=4.0, help="offered load / capacity")
    parser.add_argument("--slots", type=int, default=8, help="the simulator's --max-num-seqs")
    parser.add_argument("--deadline-ms", type=int, default=2000, help="scheduling.deadline_ms")
    parser.add_argument("--slo-ms", type=int, default=2500, help="TTFT goal for goodput")
    parser.add_argument("--capacity-duration", type=float, default=10)
    parser.add_argument(
        "--drain-timeout", type=float, default=240, help="after the window, then unfinished"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--decode-base-ms", type=float, default=10.0)
    parser.add_argument("--decode-per-seq-ms", type=float, default=0.5)
    parser.add_argument("--output-tokens", default="48:80", help="min:max natural answer length")
    parser.add_argument(
        "--no-record", action="store_true", help="print only; leave RESULTS.md as it is"
    )
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument(
        "--load-cpu", type=int, default=1, help="the load generator, the simulator and Redis"
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeats < 1 or args.slots < 1 or args.overload <= 0:
        parser.error("--duration, --repeats and --slots must be at least 1, --overload > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("overload", parse_args(argv), execute)


def engine_flags(args: argparse.Namespace) -> list[str]:
    low, high = args.output_tokens.split(":")
    return [
        "--max-num-seqs", str(args.slots),
        "--decode-base-ms", str(args.decode_base_ms),
        "--decode-per-seq-ms", str(args.decode_per_seq_ms),
        "--output-tokens-min", low, "--output-tokens-max", high,
    ]  # fmt: skip


def start_stack(args: argparse.Namespace, procs: Procs, tmp: Path) -> tuple[Server, Server]:
    redis = start_redis(procs, tmp, args.load_cpu)
    sim = start_sim(procs, tmp, args.load_cpu, engine_flags(args))
    config = gateway_config(
        sim,
        [{"key": API_KEY, "tenant": "bench"}],
        max_num_seqs=args.slots,
        redis={"url": redis.url},
        scheduling={"deadline_ms": args.deadline_ms},
    )
    gateway = start_gateway(procs, tmp, args.gateway_cpu, config)
    wait_sim(sim, args.load_cpu)
    wait_gateway(gateway, args.gateway_cpu)
    sanity_check("direct", sim.chat_url, API_KEY, gateway=False)
    sanity_check("gateway", gateway.chat_url, API_KEY, gateway=True)
    return sim, gateway


class LoadRunner:
    """Runs the load generator, pinned, as its own process; reads its result file."""

    def __init__(self, args: argparse.Namespace, procs: Procs, tmp: Path):
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.count = 0

    def run(
        self, url: str, mode: list[str], duration: float, watch: list[str], gateway: Server
    ) -> tuple[LoadResult, float, float]:
        """(result, load core busy, gateway CPU seconds), both over about the window."""
        self.count += 1
        out = self.tmp / f"load-{self.count}.json"
        argv = [
            sys.executable, "-m", "bench.overload.loadgen", "--url", url, "--key", API_KEY,
            "--model", MODEL, "--max-tokens", str(self.args.max_tokens), "--out", str(out),
            "--duration", str(duration), "--drain-timeout", str(self.args.drain_timeout),
            *mode, *(f"--watch={w}" for w in watch),
        ]  # fmt: skip
        cpu = self.args.load_cpu
        proc = self.procs.start(
            f"loadgen-{self.count}", pinned(cpu, argv), self.tmp / f"load-{self.count}.log"
        )
        cores_before = cpu_times([cpu])
        gw_before = cpu_seconds(gateway.proc.pid)
        time.sleep(0.3)  # the interpreter starting
        check_pinned(proc, cpu)
        time.sleep(duration)
        busy = busy_fraction(cores_before[cpu], cpu_times([cpu])[cpu])
        gw_cpu = cpu_seconds(gateway.proc.pid) - gw_before
        try:
            code = proc.popen.wait(duration + self.args.drain_timeout + 60)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"load generator did not end: {exc}\n{proc.log_tail()}") from exc
        self.procs.stop(proc)
        if code != 0:
            raise BenchError(f"load generator exited with {code}:\n{proc.log_tail()}")
        return LoadResult.from_json(json.loads(out.read_text())), busy, gw_cpu


def sim_stats(sim: Server) -> dict[str, Any]:
    status, _, body = http("GET", f"{sim.base}/sim/stats")
    if status != 200:
        raise BenchError(f"simulator /sim/stats answered {status}")
    stats: dict[str, Any] = json.loads(body)
    return stats


def wait_idle(sim: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = sim_stats(sim)
        if not stats["in_flight"] and not stats["running"] and not stats["waiting"]:
            return
        time.sleep(0.2)
    raise BenchError(f"simulator still busy {timeout:.0f} s after a run: {sim_stats(sim)}")


def measure_capacity(
    loads: LoadRunner, args: argparse.Namespace, url: str, gateway: Server
) -> Capacity:
    mode = ["--concurrency", str(args.slots)]
    result, _, _ = loads.run(url, mode, args.capacity_duration, [], gateway)
    bad = [r for r in result.records if r.kind != "ok"]
    if bad:
        raise BenchError(f"capacity run at {url}: {len(bad)} requests failed, e.g. {bad[0]}")
    return capacity(result, args.slots)


def kept_up_note(runs: Sequence[Run]) -> str:
    """Whether the load generator and the gateway had room: the worst of every run."""
    lag_p99 = max(r.load.send_lag_p99_s for r in runs) * 1000
    lag_max = max(r.load.send_lag_max_s for r in runs) * 1000
    own = max(r.load.cpu_s / r.load.duration_s for r in runs)
    core = max(r.load_core_busy for r in runs)
    gateway = max((r.gateway_cpu_s or 0.0) / r.load.duration_s for r in runs)
    return (
        f"headroom (worst run): load generator sent requests at most {lag_p99:.1f} ms late "
        f"at p99 ({lag_max:.1f} ms max) using {100 * own:.0f}% of a core; load core at most "
        f"{100 * core:.0f}% busy (every process on it); gateway at most {100 * gateway:.0f}% "
        "of its core"
    )


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    sim, gateway = start_stack(args, procs, tmp)
    urls = {"direct": sim.chat_url, "gateway": gateway.chat_url}
    loads = LoadRunner(args, procs, tmp)
    print(
        f"gateway pid {gateway.proc.pid} on cpu {args.gateway_cpu}; simulator pid "
        f"{sim.proc.pid}, Redis and the load generator on cpu {args.load_cpu}; "
        f"load average {load_before}",
        flush=True,
    )
    print(f"capacity: closed loop at {args.slots} ({args.capacity_duration:.0f} s each way)")
    caps = {t: measure_capacity(loads, args, urls[t], gateway) for t in TARGETS}
    for target, cap in caps.items():
        print(f"  {target}: {cap.rps:.2f} req/s (mean request {cap.mean_duration_s:.3f} s)")
    rate = args.overload * caps["direct"].rps
    watch_sim = f"sim_waiting={sim.base}/metrics@vllm:num_requests_waiting"
    watch_gw = f"gateway_queue={gateway.base}/metrics@tollway_queue_depth"
    print(f"open loop: {rate:.1f} req/s for {args.duration:.0f} s, {args.repeats} x each path")
    runs: list[Run] = []
    stats = []
    for repeat in range(args.repeats):
        for target in TARGETS:
            wait_idle(sim)
            http("POST", f"{sim.base}/sim/reset")
            watch = [watch_sim] + ([watch_gw] if target == "gateway" else [])
            mode = ["--rate", f"{rate:.4f}", "--seed", str(repeat)]
            result, busy, gw_cpu = loads.run(urls[target], mode, args.duration, watch, gateway)
            for proc in (sim.proc, gateway.proc):
                check_alive(proc)
            peak = int(sim_stats(sim)["max_waiting_seen"])
            run = Run(target, repeat, result, peak, busy, gw_cpu if target == "gateway" else None)
            runs.append(run)
            stats.append(run_stats(run, args.slo_ms / 1000))
            print(run_line(run, stats[-1]), flush=True)
    load_after = load_average()
    notes = [
        f"load average (1/5/15 min): {load_before} before, {load_after} after",
        f"tier: `tollway sim {' '.join(engine_flags(args))}`, streamed chat, unique prompts, "
        f"max_tokens {args.max_tokens}",
        f"capacity (closed loop at {args.slots} = max_num_seqs, {args.capacity_duration:.0f} s): "
        + "; ".join(
            f"{t} {c.rps:.2f} req/s (slots / mean duration {c.mean_duration_s:.3f} s; "
            f"{c.window_rps:.2f} req/s ended in the window)"
            for t, c in caps.items()
        ),
        f"offered: open-loop Poisson at {args.overload:g} x direct capacity = {rate:.1f} req/s "
        f"for {args.duration:.0f} s, same seeded schedule on both paths; medians of "
        f"{args.repeats} alternating runs",
        f"gateway: admission slots = max_num_seqs = {args.slots}, "
        f"`scheduling.deadline_ms: {args.deadline_ms}`; Redis on; goodput SLO: "
        f"TTFT <= {args.slo_ms / 1000:g} s (TTFT = to the first chunk with content)",
        "no client-side timeout: requests still running "
        f"{args.drain_timeout:.0f} s after the window are counted as unfinished",
        kept_up_note(runs),
    ]
    publish(
        result=table(medians(stats)),
        notes=notes,
        head=section_head(
            "overload",
            f"{args.overload:g}x the load a simulator tier can serve, open-loop and streamed: "
            "through tollway (admission) vs direct.",
            started,
            command,
        ),
        pinning=f"gateway on cpu {args.gateway_cpu}; load generator, simulator and Redis on "
        f"cpu {args.load_cpu}",
        runs_detail="\n".join(run_line(r, s) for r, s in zip(runs, stats, strict=True)),
        no_record=args.no_record,
    )


if __name__ == "__main__":
    sys.exit(main())
