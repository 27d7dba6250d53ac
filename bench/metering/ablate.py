"""Several gateway variants loaded together on one core: which change moves metering's cost.

``run.py`` compares a metered gateway with an unmetered one. To see what one
change (or one step left out) is worth, this loads two to five gateways at the
same time on the gateway core, each under its own wrk, round after round, and
prints each one's CPU per request against the first's: the median of the
rounds' ratios. Loaded together, host noise hits every variant alike. But a
gateway process keeps its own luck for its whole life: two processes of the
same code stayed up to ~1.4% apart over every round of one run (2026-11-23,
session 9: the same code -0.9% and +1.1% to +1.4% against another process of
it). So every round starts every gateway anew by default (``--fresh-every``),
and the median over rounds is over as many process pairs.

A variant is ``NAME=on|off[,sampling=R][,path=DIR]``: metering on (spans to a
null OTLP collector at the gateway's default sampling, or ``R``) or off;
``path`` is put first on the gateway's ``PYTHONPATH``, e.g. a worktree of an
earlier commit, or a directory whose ``sitecustomize.py`` stubs one step out::

    .venv/bin/python bench/metering/ablate.py off=off on=on earlier=on,path=/work/wt-old
    .venv/bin/python bench/metering/ablate.py on=on rare=on,sampling=0.0001 --rounds 10

Nothing is recorded: copy what matters into bench/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib.entry import add_fresh_every_argument, run_benchmark
from bench.lib.measure import Target, load_together, measure_together
from bench.lib.otlp_sink import start_sink
from bench.lib.procs import Procs
from bench.lib.redis_server import start_redis
from bench.lib.stack import MODEL, Server, start_gateway, start_sim, wait_gateway, wait_sim
from bench.lib.wrk import Wrk, ensure_wrk
from bench.metering.sides import side


@dataclass(frozen=True)
class Variant:
    name: str
    metered: bool
    sampling: float | None = None
    path: str | None = None

    @property
    def key(self) -> str:
        return f"sk-tollway-ablate-{self.name}"


def parse_variant(text: str) -> Variant:
    """``NAME=on|off[,sampling=R][,path=DIR]``."""
    name, sep, rest = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"{text!r}: want NAME=on|off[,sampling=R][,path=DIR]")
    mode, *options = rest.split(",")
    if mode not in ("on", "off"):
        raise ValueError(f"{text!r}: metering must be 'on' or 'off'")
    sampling: float | None = None
    path: str | None = None
    for option in options:
        key, _, value = option.partition("=")
        if key == "sampling" and mode == "on":
            sampling = float(value)
            if not 0 < sampling <= 1:
                raise ValueError(f"{text!r}: sampling must be in (0, 1]")
        elif key == "path" and value:
            path = value
        else:
            raise ValueError(f"{text!r}: unknown option {option!r}")
    return Variant(name, mode == "on", sampling, path)


def relative(cpu: dict[str, list[float]], base: str) -> dict[str, tuple[float, list[float]]]:
    """Each variant's rounds as (cpu / base's cpu - 1), and their median."""
    out = {}
    for name, rounds in cpu.items():
        ratios = [mine / theirs - 1 for mine, theirs in zip(rounds, cpu[base], strict=True)]
        out[name] = (statistics.median(ratios), ratios)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=parse_variant, metavar="NAME=on|off[,...]")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=int, default=6, help="seconds of load per round")
    parser.add_argument("--settle", type=float, default=3.0, help="CPU window after each round")
    parser.add_argument("--connections", type=int, default=16, help="per gateway")
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    add_fresh_every_argument(parser)
    args = parser.parse_args(argv)
    names = [v.name for v in args.variants]
    if not 2 <= len(names) <= 5 or len(set(names)) != len(names):
        parser.error("give two to five variants, with distinct names")
    return args


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    variants: list[Variant] = args.variants
    redis = start_redis(procs, tmp, args.load_cpu)
    sink = start_sink(procs, tmp, args.load_cpu)
    sim = start_sim(procs, tmp, args.load_cpu)
    keys = [{"key": v.key, "tenant": f"ablate-{v.name}"} for v in variants]
    sides = []
    for variant in variants:
        config, env = side(
            sim, keys, redis.url, sink.base, metered=variant.metered, sampling=variant.sampling
        )
        if variant.path:
            env["PYTHONPATH"] = variant.path
        sides.append((variant, config, env))
    wait_sim(sim, args.load_cpu)
    wrk = Wrk(ensure_wrk(), args.load_cpu, MODEL, 16)
    print(
        f"{command}\n{len(variants)} gateways on cpu {args.gateway_cpu}, started anew every "
        f"{args.fresh_every} round(s)",
        flush=True,
    )
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    names = {v.key: v.name for v in variants}
    gateways: list[Server] = []
    targets: list[Target] = []
    for round_ in range(args.rounds):
        if round_ % args.fresh_every == 0:  # new processes: each one's own luck averages out
            for gateway in gateways:
                procs.stop(gateway.proc)
            gateways = [
                start_gateway(
                    procs, tmp, args.gateway_cpu, config, name=f"gateway-{variant.name}", env=env
                )
                for variant, config, env in sides
            ]
            for gateway in gateways:
                wait_gateway(gateway, args.gateway_cpu)
            targets = [
                Target(g.chat_url, v.key, g.proc)
                for g, (v, _, _) in zip(gateways, sides, strict=True)
            ]
            load_together(wrk, targets, args.connections, 3, upstream=sim.proc)  # warm up
        order = targets if round_ % 2 == 0 else targets[::-1]
        samples = measure_together(
            wrk, order, args.connections, args.duration,
            upstream=sim.proc, cores=(args.gateway_cpu, args.load_cpu), settle_s=args.settle,
        )  # fmt: skip
        for target, sample in zip(order, samples, strict=True):
            cpu[names[target.key]].append(sample.gateway_cpu_us_per_request)
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{name} {rounds[-1]:.0f} µs" for name, rounds in cpu.items()),
            flush=True,
        )
    base = variants[0].name
    for name, (median, ratios) in relative(cpu, base).items():
        spread = ", ".join(f"{r * 100:+.1f}" for r in ratios)
        print(f"{name}: {median * 100:+.1f}% CPU per request vs {base} (rounds {spread})")


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("ablate", parse_args(argv), execute)


if __name__ == "__main__":
    sys.exit(main())
