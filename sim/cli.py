"""Command line: `python -m sim ...`, and `tollway sim ...` through the two functions below.

`configure_parser` adds the flags to a parser someone else owns (the tollway
CLI's sub-command, or `sim.__main__`); `run` builds a `SimConfig` from the
parsed flags and serves until SIGINT/SIGTERM, then shuts down gracefully:
stop accepting, release hung requests, let streams finish (up to
`--shutdown-timeout`), stop the engine loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys

from aiohttp import web
from pydantic import ValidationError

from sim.app import create_app
from sim.config import SimConfig
from sim.faults import FaultSettings

log = logging.getLogger("sim")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = SimConfig()
    f = FaultSettings()
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    net.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    net.add_argument(
        "--model",
        "--served-model-name",
        dest="models",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="served model name(s); repeat or list several for aliases (first is canonical)",
    )
    net.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="grace for in-flight streams at shutdown (default: %(default)s)",
    )
    net.add_argument("--access-log", action="store_true", help="log every request (costs CPU)")
    net.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop; auto = uvloop when installed",
    )

    eng = parser.add_argument_group("engine")
    eng.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="batch slots (default: %(default)s)",
    )
    eng.add_argument(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help="context window in tokens (default: %(default)s)",
    )
    eng.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=d.kv_cache_tokens,
        help="KV cache capacity in tokens (default: %(default)s)",
    )
    eng.add_argument(
        "--block-size",
        type=int,
        default=d.block_size,
        help="KV block size in tokens (default: %(default)s)",
    )
    eng.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=d.prefill_tokens_per_s,
        help="prefill speed; inf = free (default: %(default)s)",
    )
    eng.add_argument(
        "--decode-base-ms",
        type=float,
        default=d.decode_base_ms,
        help="fixed cost of a decode step (default: %(default)s)",
    )
    eng.add_argument(
        "--decode-per-seq-ms",
        type=float,
        default=d.decode_per_seq_ms,
        help="step cost per running sequence (default: %(default)s)",
    )
    eng.add_argument(
        "--zero-delay",
        action="store_true",
        help="every step costs nothing (overrides the three timing flags): for load tests",
    )
    eng.add_argument(
        "--output-tokens-min",
        type=int,
        default=d.output_tokens_min,
        help="shortest natural answer (default: %(default)s)",
    )
    eng.add_argument(
        "--output-tokens-max",
        type=int,
        default=d.output_tokens_max,
        help="longest natural answer (default: %(default)s)",
    )
    eng.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seeds the output corpus and fault RNG (default: %(default)s)",
    )

    flt = parser.add_argument_group("fault injection (also settable at runtime: /sim/faults)")
    flt.add_argument(
        "--error-rate",
        type=float,
        default=f.error_rate,
        help="fraction of requests failed with --error-status",
    )
    flt.add_argument(
        "--error-status",
        type=int,
        default=f.error_status,
        help="status of injected errors (default: %(default)s)",
    )
    flt.add_argument(
        "--added-latency-ms",
        type=float,
        default=f.added_latency_ms,
        help="delay before every completion response",
    )
    flt.add_argument(
        "--hang-rate", type=float, default=f.hang_rate, help="fraction of requests never answered"
    )
    flt.add_argument(
        "--die-mid-stream-rate",
        type=float,
        default=f.die_mid_stream_rate,
        help="fraction of requests whose connection is cut",
    )
    flt.add_argument(
        "--die-after-tokens",
        type=int,
        default=f.die_after_tokens,
        help="tokens sent before the cut (default: %(default)s)",
    )
    flt.add_argument("--unhealthy", action="store_true", help="GET /health answers 503")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Raises pydantic.ValidationError for inconsistent flags."""
    timing = (
        {"prefill_tokens_per_s": math.inf, "decode_base_ms": 0.0, "decode_per_seq_ms": 0.0}
        if args.zero_delay
        else {
            "prefill_tokens_per_s": args.prefill_tokens_per_s,
            "decode_base_ms": args.decode_base_ms,
            "decode_per_seq_ms": args.decode_per_seq_ms,
        }
    )
    faults = FaultSettings(
        error_rate=args.error_rate,
        error_status=args.error_status,
        added_latency_ms=args.added_latency_ms,
        hang_rate=args.hang_rate,
        die_mid_stream_rate=args.die_mid_stream_rate,
        die_after_tokens=args.die_after_tokens,
        unhealthy=args.unhealthy,
    )
    names = args.models or ["sim-model"]
    return SimConfig(
        served_model_names=names,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        block_size=args.block_size,
        output_tokens_min=args.output_tokens_min,
        output_tokens_max=args.output_tokens_max,
        seed=args.seed,
        faults=faults,
        **timing,
    )


def _new_loop(choice: str) -> asyncio.AbstractEventLoop:
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        print(f"sim: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    log.info(
        "serving %s on http://%s:%d (max_num_seqs=%d, %s)",
        ", ".join(config.served_model_names),
        args.host,
        args.port,
        config.max_num_seqs,
        "zero-delay" if config.zero_delay else "timed",
    )
    try:
        web.run_app(
            create_app(config),
            host=args.host,
            port=args.port,
            shutdown_timeout=args.shutdown_timeout,
            handler_cancellation=True,
            access_log=logging.getLogger("aiohttp.access") if args.access_log else None,
            print=None,
            loop=_new_loop(args.loop),
        )
    except OSError as exc:  # the port is taken, the host is not ours...
        print(f"sim: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0
