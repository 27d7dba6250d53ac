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
