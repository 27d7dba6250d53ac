"""What every benchmark script's ``main`` does: check the cores, then run guarded."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bench.lib.cpu import two_cpus_problem
from bench.lib.procs import Procs, guarded, install_signal_handlers
from bench.lib.report import command_line

Execute = Callable[[argparse.Namespace, Procs, Path, str], None]


def run_benchmark(name: str, args: argparse.Namespace, execute: Execute) -> int:
    """Run ``execute(args, procs, tmp, command)`` with cleanup on any exit; 2 if cores are bad."""
    install_signal_handlers()
    problem = two_cpus_problem(args.gateway_cpu, args.load_cpu)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    command = command_line()
    return guarded(name, lambda procs, tmp: execute(args, procs, tmp, command))


def clean_env() -> dict[str, str]:
    """This environment minus anything that would switch tracing on or move the config."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TOLLWAY_"))}


def add_load_arguments(
    parser: argparse.ArgumentParser,
    *,
    repeats: int,
    repeats_help: str,
    load_help: str,
    gateway_help: str | None = None,
) -> None:
    """The options every benchmark has: how long, how hard, how often, which cores."""
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=16, help="for the throughput runs")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per path")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--no-record", action="store_true", help="print only; leave RESULTS.md as it is"
    )
    parser.add_argument("--gateway-cpu", type=int, default=0, help=gateway_help)
    parser.add_argument("--load-cpu", type=int, default=1, help=load_help)


def add_turns_arguments(
    parser: argparse.ArgumentParser,
    *,
    together_duration: int,
    rounds_help: str,
    settle_s: float,
    settle_help: str,
) -> None:
    """The options of a benchmark comparing two gateways: rounds with both loaded at once,
    and how long a run's CPU window stays open after wrk stops (``check_turns_arguments``)."""
    parser.add_argument("--together-rounds", type=int, default=5, help=rounds_help)
    parser.add_argument(
        "--together-duration", type=int, default=together_duration,
        help="seconds per together round",
    )  # fmt: skip
    parser.add_argument("--settle", type=float, default=settle_s, help=settle_help)


def check_turns_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.together_rounds < 0 or args.together_duration < 1 or args.settle < 0:
        parser.error("--together-rounds must be >= 0, --together-duration >= 1, --settle >= 0")


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway afterwards")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: also C frames (uvloop, httptools, libc), to split the event loop",
    )
