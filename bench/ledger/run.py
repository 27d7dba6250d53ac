"""The ledger's cost: rows per second into PostgreSQL; the gateway's throughput, ledger on vs off.

Two parts, one PostgreSQL 15 (fsync on, the ledger's setting) pinned to the
load core:

1. **The batch writer** (``batch_writer.py``), in this process pinned to the
   gateway core: a real ``LedgerWriter`` (spool on local disk) stores
   ``--rows`` synthetic requests' rows, recorded ``--record-batch`` at a time
   as fast as possible, timed until ``flush`` says all are in PostgreSQL; then
   the insert statement alone at ``--insert-batches`` rows. Rows/s, and CPU
   per row of the gateway's side and of PostgreSQL; the rows and their hourly
   sums are counted in SQL.
2. **The gateway, ledger on vs off** (``gateways.py``): two ``tollway serve``
   on the gateway core, the same simulator (``--zero-delay``) and Redis on the
   load core; one has ``database:`` (and its spool), the other none. First
   ``--repeats`` rounds of ``--duration`` s with one gateway at a time, the two
   taking turns (requests/s and CPU per request of a gateway alone on its
   core), then ``--together-rounds`` of ``--together-duration`` s with both
   loaded at once (the steady ratio on this noisy VM). The target, judged on
   the together rounds: the ledger costs at most 10% of the requests/s.
   Afterwards the ledger-on gateway's rows in PostgreSQL must equal the
   requests it finished.

Unless ``--no-record``, the run replaces the ``ledger`` section of
``bench/RESULTS.md``. See ``bench/ledger/README.md``.

    .venv/bin/python bench/ledger/run.py [--duration 10] [--repeats 3] [--together-rounds 5]
        [--rows 100000] [--only writer|gateway] [--no-record] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.ledger.batch_writer import WriterPlan, measure_writer
from bench.ledger.gateways import GatewayResult, run_gateways
from bench.ledger.postgres import (
    ledger_counts,
    on_cpu,
    pinned_postgres,
    postgres_version,
    postmaster_pid,
)
from bench.ledger.summary import (
    ALONE,
    TOGETHER,
    WriterRun,
    gateway_table,
    limit_note,
    round_ratios,
    summarise,
    verdict,
    verdict_table,
    writer_table,
)
from bench.lib import BenchError
from bench.lib.cpu import load_average
from bench.lib.entry import (
    add_load_arguments,
    add_profile_arguments,
    add_turns_arguments,
    check_turns_arguments,
    clean_env,
    run_benchmark,
)
from bench.lib.procs import Procs
from bench.lib.profile import ensure_pyspy
from bench.lib.redis_server import redis_version
from bench.lib.report import publish, section_head
from bench.lib.stack import MODEL, tollway_bin
from bench.lib.wrk import Wrk, ensure_wrk
from tests.support.postgres_server import PostgresServer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_load_arguments(
        parser,
        repeats=3,
        repeats_help="rounds with one gateway at a time: each runs both gateways once",
        load_help="wrk, the simulator, Redis and PostgreSQL",
        gateway_help="both gateways, and the batch writer's runs",
    )
    add_profile_arguments(parser)
    parser.add_argument("--only", choices=("writer", "gateway"), help="run one part only")
    add_turns_arguments(
        parser,
        together_duration=6,
        rounds_help="rounds with both gateways loaded at once (0: none; the target is then "
        "judged on the alone rounds)",
        settle_s=1.5,
        settle_help="seconds a gateway's CPU window stays open after wrk stops, so the "
        "ledger's last write (write_interval_s 1 s after the recorder's 0.2 s) is charged to "
        "the run",
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the end-to-end run")
    parser.add_argument(
        "--record-batch", type=int, default=250,
        help="reports per record_many: what the recorder gathers in its 0.2 s at ~1,250 req/s",
    )  # fmt: skip
    parser.add_argument("--batch-rows", type=int, default=5000, help="the writer's batch_rows")
    parser.add_argument(
        "--insert-batches", type=int, nargs="+", default=[500, 5000],
        help="batch sizes of the insert statement run alone",
    )  # fmt: skip
    parser.add_argument(
        "--insert-rows", type=int, default=30_000, help="rows per insert batch size"
    )
    args = parser.parse_args(argv)
    if min(args.duration, args.repeats, args.connections, args.rows, args.record_batch) < 1:
        parser.error("--duration, --repeats, --connections, --rows, --record-batch must be >= 1")
    if min(args.insert_batches) < 1 or args.batch_rows < 1:
        parser.error("--insert-batches and --batch-rows must be >= 1")
    check_turns_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("ledger", parse_args(argv), execute)


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    wrk = Wrk(ensure_wrk(), args.load_cpu, MODEL, args.max_tokens)
    if args.profile:
        ensure_pyspy()
    parts: list[str] = []
    notes: list[str] = []
    gateways: GatewayResult | None = None
    with pinned_postgres(args.load_cpu) as server:
        postgres = postmaster_pid(server)
        print(f"PostgreSQL pid {postgres} on cpu {args.load_cpu}, fsync on", flush=True)
        if args.only != "gateway":
            writer_runs = run_writer(args, server, postgres, tmp)
            parts += [
                f"Batch writer: rows into PostgreSQL (this process on cpu {args.gateway_cpu}, "
                f"PostgreSQL on cpu {args.load_cpu}):",
                writer_table(writer_runs),
            ]
            notes += writer_notes(args, writer_runs)
        if args.only != "writer":
            server.reset()  # the gateway's rows alone, so they can be counted
            migrate(server.url)
            gateways = run_gateways(args, procs, tmp, wrk, server)
            parts += gateway_parts(args, gateways)
            notes += gateway_notes(args, gateways)
    publish(
        result="\n\n".join(parts),
        notes=[f"load average (1/5/15 min): {load_before} before, {load_average()} after", *notes],
        head=section_head(
            "ledger",
            "The usage ledger's cost: rows per second one gateway's batch writer stores in "
            "PostgreSQL (fsync on), and the gateway's throughput with the ledger on vs off.",
            started,
            command,
            [postgres_version(), redis_version()],
        ),
        pinning=f"gateways and the batch writer on cpu {args.gateway_cpu}; PostgreSQL, wrk, "
        f"simulator and Redis on cpu {args.load_cpu}",
        runs_detail="\n".join(f"- {run.line()}" for run in gateways.runs) if gateways else None,
        profile_text=gateways.profile if gateways else None,
        no_record=args.no_record,
    )


TITLES = {
    ALONE: "one at a time, each alone on cpu {cpu}",
    TOGETHER: "both at once, sharing cpu {cpu} (about half each)",
}
METHODS = {ALONE: "one at a time", TOGETHER: "both at once"}


def gateway_parts(args: argparse.Namespace, result: GatewayResult) -> list[str]:
    """The tables of part 2: alone, together, then the target (judged on together's rounds
    when there are any: they are the steady ones)."""
    parts = []
    for mode in (ALONE, TOGETHER):
        rows = summarise(result.runs, mode)
        if rows:
            parts += [
                f"Gateway, {args.connections} connections each, "
                f"{TITLES[mode].format(cpu=args.gateway_cpu)}:",
                gateway_table(rows, round_ratios(result.runs, mode)),
            ]
    modes = [m for m in (TOGETHER, ALONE) if round_ratios(result.runs, m)]
    verdicts = [
        verdict(METHODS[m] + (" (judged)" if i == 0 else ""), round_ratios(result.runs, m))
        for i, m in enumerate(modes)
    ]
    return [*parts, "Target:", verdict_table(verdicts)]


def gateway_notes(args: argparse.Namespace, result: GatewayResult) -> list[str]:
    alone = summarise(result.runs, ALONE)
    return [
        f"gateways alone: medians of {args.repeats} rounds of {args.duration} s per gateway, "
        "the two taking turns (reversed every other round); together: "
        f"{args.together_rounds} rounds of {args.together_duration} s, both gateways loaded "
        "at once, each by its own wrk; on vs off and the target: the median of the rounds' "
        "ratios; unique prompts; max_tokens "
        f"{args.max_tokens}; upstream = `tollway sim --zero-delay`; metering on in both",
        f"gateway CPU: utime + stime over the run plus {args.settle:g} s, per request wrk "
        "counted; PostgreSQL CPU: every server process, same window (together: charged to "
        "the ledger-on gateway's requests)",
        result.checked,
        *limit_note(alone, args.gateway_cpu, args.load_cpu),
    ]


def run_writer(
    args: argparse.Namespace, server: PostgresServer, postgres: int, tmp: Path
) -> list[WriterRun]:
    """Part 1 in this process, on the gateway core; every row checked in SQL."""
    print(f"batch writer on cpu {args.gateway_cpu} ...", flush=True)
    plan = WriterPlan(
        rows=args.rows,
        record_batch=args.record_batch,
        batch_rows=args.batch_rows,
        insert_rows=args.insert_rows,
        insert_batches=tuple(args.insert_batches),
    )
    with on_cpu(args.gateway_cpu):
        runs = measure_writer(server.url, tmp / "writer-spool", postgres, plan)
    stored, summed = ledger_counts(server)
    expected = sum(run.rows for run in runs)
    if stored != expected or summed != expected:
        raise BenchError(
            f"PostgreSQL holds {stored:,} rows summed as {summed:,} requests; "
            f"the writer runs stored {expected:,}"
        )
    return runs


def writer_notes(args: argparse.Namespace, runs: Sequence[WriterRun]) -> list[str]:
    e2e = runs[0]
    return [
        f"batch writer: {e2e.rows:,} synthetic rows (6 tenants, 18 keys, 2 tiers, 5 cache "
        "statuses, 3% errors, over the last 3 hours), recorded "
        f"{args.record_batch} per `record_many` (the last returned after "
        f"{e2e.record_s or 0:.2f} s), spool fsync'd on local disk, `batch_rows` "
        f"{args.batch_rows}; then the insert statement alone on one connection; "
        f"PostgreSQL 15 defaults with fsync on; counted in SQL afterwards: "
        f"{sum(r.rows for r in runs):,} rows in `usage_requests` and as many requests in "
        "`usage_hourly`",
        "gateway CPU per row: this process (all threads) over the window; PostgreSQL CPU: "
        "the postmaster and every process it started",
    ]


def migrate(url: str) -> None:
    argv = [tollway_bin(), "db", "migrate", "--database-url", url]
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), check=False)
    if done.returncode != 0:
        raise BenchError(f"tollway db migrate failed:\n{done.stdout}{done.stderr}")


if __name__ == "__main__":
    sys.exit(main())
