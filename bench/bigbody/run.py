"""The gateway's RSS under big many-message bodies: how far it grows, and where it levels off.

Starts the fixed-answer upstream (``bench/bigbody/upstream.py``) and one
``tollway serve`` (one tier whose replica is that upstream, one API key, no
Redis, no tracing), sends ``--warmup`` small requests, then ``--requests``
sequential POSTs of one big body (``--messages`` times
``{"role":"user","content":"hi"}``: 100,000 make 3.1 MB) from one client,
reading the gateway's VmRSS from ``/proc`` after every ``--every`` of them,
then ``--small`` small requests and ``--idle`` seconds of nothing. Every
answer must be a 200, and the whole run must finish within ``--deadline``
seconds. It prints the RSS series and where it levelled off; unless
``--no-record``, the run replaces the ``bigbody`` section of
``bench/RESULTS.md``.

The gateway's code can come from another commit, so one command measures
before and after a change: ``--rev REV`` runs ``git archive REV`` of this
repository, ``--code DIR`` another checkout (a ``git worktree``, say). That
tree goes first on the gateway's ``PYTHONPATH``; everything else (the venv,
this script, the upstream) stays as it is here. See ``bench/bigbody/README.md``.

    .venv/bin/python bench/bigbody/run.py [--rev REV | --code DIR] [--requests 100]
        [--every 10] [--small 50] [--messages 100000] [--env NAME=VALUE] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import REPO, BenchError
from bench.lib.cpu import load_average
from bench.lib.entry import clean_env, run_benchmark
from bench.lib.net import free_port, http, wait_ready
from bench.lib.procs import Procs, check_pinned, pinned, run_quiet
from bench.lib.report import git_commit, markdown_table, publish, section_head
from bench.lib.stack import MODEL, Server, gateway_config, start_gateway, wait_gateway

API_KEY = "sk-tollway-bench-bigbody"
UPSTREAM = Path(__file__).resolve().parent / "upstream.py"
PACKAGES = ("gateway", "router", "cache", "metering", "sim")
WHAT = (
    "The gateway's RSS while it answers big many-message bodies one after another: "
    "how far it grows and where it levels off."
)


@dataclass(frozen=True)
class Code:
    """The tree whose ``gateway`` package the measured gateway runs."""

    root: Path
    label: str


@dataclass(frozen=True)
class Sample:
    label: str
    big: int  # big requests answered so far
    rss_kb: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--rev", help="run the gateway from `git archive REV` of this repository")
    where.add_argument("--code", help="run the gateway from this checkout (its gateway/ etc.)")
    parser.add_argument("--requests", type=int, default=100, help="big requests, one at a time")
    parser.add_argument("--every", type=int, default=10, help="read RSS after every N big ones")
    parser.add_argument("--messages", type=int, default=100_000, help="messages per big body")
    parser.add_argument("--warmup", type=int, default=20, help="small requests before")
    parser.add_argument("--small", type=int, default=50, help="small requests after")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before the last read")
    parser.add_argument(
        "--flat-mb",
        type=float,
        default=2.0,
        help="levelled off: from that reading on, RSS rose by at most this much",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the gateway's environment (e.g. PYTHONMALLOC=malloc); repeatable",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="print only; leave RESULTS.md as it is"
    )
    parser.add_argument("--gateway-cpu", type=int, default=0, help="the gateway, alone")
    parser.add_argument("--load-cpu", type=int, default=1, help="the upstream and this client")
    args = parser.parse_args(argv)
    if min(args.requests, args.every, args.messages) < 1 or min(args.warmup, args.small) < 0:
        parser.error("--requests, --every and --messages must be >= 1; --warmup, --small >= 0")
    if any("=" not in item for item in args.env):
        parser.error("--env takes NAME=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("bigbody", parse_args(argv), execute)


def describe_checkout(root: Path) -> str:
    return f"commit {git_commit(root)}"


def export_rev(rev: str, tmp: Path) -> Code:
    """``git archive`` of ``rev`` unpacked under ``tmp``."""
    sha = run_quiet(
        ["git", "-C", str(REPO), "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"]
    )
    if sha.returncode != 0:
        raise BenchError(f"--rev {rev}: not a commit of {REPO}: {sha.stderr.strip()}")
    short = sha.stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", short],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {short} failed: {archive.stderr.decode(errors='replace')}")
    root = tmp / f"code-{short}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    return Code(root, f"commit {short} (`git archive` of `{rev}`)")


def resolve_code(args: argparse.Namespace, tmp: Path) -> Code:
    if args.rev:
        return export_rev(args.rev, tmp)
    if args.code:
        root = Path(args.code).resolve()
        if not (root / "gateway" / "cli.py").is_file():
            raise BenchError(f"--code {root}: no gateway/cli.py there")
        return Code(root, f"`{root}` at {describe_checkout(root)}")
    return Code(REPO, f"this checkout, {describe_checkout(REPO)}")


def native_note(code: Code) -> str:
    """Which compiled modules the tree holds, and C sources left unbuilt (a Python fallback)."""
    found: dict[str, list[str]] = {"built": [], "source": []}
    for package in PACKAGES:
        for path in sorted((code.root / package).rglob("*")):
            kind = {".so": "built", ".c": "source"}.get(path.suffix)
            if kind:
                found[kind].append(str(path.relative_to(code.root)))
    if found["built"]:
        return "compiled modules in the gateway's tree: " + ", ".join(found["built"])
    if found["source"]:
        return (
            "C sources in the gateway's tree, not built (the code's pure-Python path ran): "
            + ", ".join(found["source"])
        )
    return "the gateway's tree is pure Python (no compiled modules, no C sources)"


def gateway_env(args: argparse.Namespace, code: Code) -> dict[str, str]:
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(code.root), *filter(None, [env.get("PYTHONPATH")])])
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def check_import(env: dict[str, str], code: Code, tmp: Path) -> None:
    """The gateway's interpreter, with its environment, must import ``gateway`` from ``code``.

    ``-P``: no script directory or cwd first on ``sys.path``, as when the
    ``tollway`` entry point runs from the venv's ``bin``.
    """
    probe = subprocess.run(
        [sys.executable, "-P", "-c", "import gateway; print(gateway.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        check=False,
    )
    origin = Path(probe.stdout.strip() or "?").resolve()
    if probe.returncode != 0 or not origin.is_relative_to(code.root):
        raise BenchError(
            f"the gateway would import {origin}, not from {code.root}: {probe.stderr.strip()}"
        )


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` plus its descendants' (a server that forks workers), in KiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    if total == 0:
        raise BenchError(f"no VmRSS for the gateway (pid {pid}): has it exited?")
    return total


def chat_body(messages: int) -> bytes:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}] * messages,
        "max_tokens": 4,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def send(url: str, body: bytes, args: argparse.Namespace, deadline: float, what: str) -> float:
    """POST ``body``; its seconds. Anything but a 200 within the limits fails the run."""
    if time.monotonic() > deadline:
        raise BenchError(f"--deadline {args.deadline:g} s passed before the {what}")
    started = time.monotonic()
    try:
        status, _, data = http("POST", url, body, key=API_KEY, timeout=args.timeout)
    except OSError as exc:
        raise BenchError(f"the {what} failed: {exc}") from exc
    if status != 200:
        raise BenchError(f"the {what} answered {status}: {data[:300]!r}")
    return time.monotonic() - started


def levelled_off(samples: Sequence[Sample], flat_kb: float) -> Sample | None:
    """The first reading after which RSS rose by at most ``flat_kb``, with two readings after it."""
    for i, sample in enumerate(samples[:-2]):
        if sample.big > 0 and max(s.rss_kb for s in samples[i:]) - sample.rss_kb <= flat_kb:
            return sample
    return None


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    os.sched_setaffinity(0, {args.load_cpu})  # this client stays off the gateway's core
    code = resolve_code(args, tmp)
    env = gateway_env(args, code)
    check_import(env, code, tmp)

    port = free_port()
    upstream = Server(
        procs.start(
            "upstream",
            pinned(args.load_cpu, [sys.executable, str(UPSTREAM), "--port", str(port)]),
            tmp / "upstream.log",
        ),
        port,
    )
    wait_ready(upstream.proc, f"{upstream.base}/health")
    check_pinned(upstream.proc, args.load_cpu)
    config = gateway_config(upstream, [{"key": API_KEY, "tenant": "bench"}])
    gateway = start_gateway(procs, tmp, args.gateway_cpu, config, env=env)
    wait_gateway(gateway, args.gateway_cpu)
    print(
        f"gateway pid {gateway.proc.pid} on cpu {args.gateway_cpu}, code: {code.label}; "
        f"upstream pid {upstream.proc.pid} and this client on cpu {args.load_cpu}; "
        f"load average {load_before}",
        flush=True,
    )

    deadline = time.monotonic() + args.deadline
    small = chat_body(1)
    for _ in range(args.warmup):  # imports, pools, first-request caches
        send(gateway.chat_url, small, args, deadline, "warm-up request")
    big = chat_body(args.messages)
    samples = [Sample(f"{args.warmup} small (warm-up)", 0, rss_kb(gateway.proc.pid))]
    print(f"after the warm-up: RSS {mb(samples[0].rss_kb)} MB", flush=True)
    seconds: list[float] = []
    for i in range(1, args.requests + 1):
        seconds.append(send(gateway.chat_url, big, args, deadline, f"big request {i}"))
        if i % args.every == 0 or i == args.requests:
            samples.append(Sample(f"{i} big", i, rss_kb(gateway.proc.pid)))
            print(
                f"{i:5d} big: RSS {mb(samples[-1].rss_kb)} MB "
                f"({(samples[-1].rss_kb - samples[0].rss_kb) / 1024:+.1f}), "
                f"{statistics.median(seconds[-args.every :]):.3f} s per request",
                flush=True,
            )
    big_samples = list(samples)
    for _ in range(args.small):
        send(gateway.chat_url, small, args, deadline, "small request after the big ones")
    samples.append(Sample(f"then {args.small} small", args.requests, rss_kb(gateway.proc.pid)))
    time.sleep(args.idle)
    samples.append(Sample(f"then {args.idle:g} s idle", args.requests, rss_kb(gateway.proc.pid)))
    load_after = load_average()

    base = samples[0].rss_kb
    rows = [
        [
            sample.label,
            mb(sample.rss_kb),
            f"{(sample.rss_kb - base) / 1024:+.1f}",
            f"{(sample.rss_kb - samples[i - 1].rss_kb) / 1024:+.1f}" if i else "-",
        ]
        for i, sample in enumerate(samples)
    ]
    columns = [("after", "l"), ("RSS MB", "r"), ("over warm-up MB", "r"), ("since last MB", "r")]
    plateau = levelled_off(big_samples, args.flat_mb * 1024)
    last = big_samples[-1]
    if len(big_samples) < 4:
        level = "too few readings to tell whether RSS levels off (give more --requests)"
    elif plateau is None:
        level = (
            f"RSS did not level off within {args.requests} big requests (to within "
            f"{args.flat_mb:g} MB over the last readings): {mb(last.rss_kb)} MB at the end"
        )
    else:
        level = (
            f"levelled off after {plateau.big} big requests at {mb(plateau.rss_kb)} MB "
            f"({(plateau.rss_kb - base) / 1024:+.1f} MB over the warm-up); it rose "
            f"{(max(s.rss_kb for s in big_samples) - plateau.rss_kb) / 1024:.1f} MB more "
            f"by request {last.big}"
        )
    extra_env = ", ".join(f"`{item}`" for item in args.env) or "none"
    notes = [
        f"gateway code: {code.label}; {native_note(code)}",
        f"{args.requests} sequential POSTs from one client of one {len(big):,}-byte body "
        f'({args.messages:,} `{{"role":"user","content":"hi"}}` messages), '
        f"{statistics.median(seconds):.3f} s per request (median), all 200; "
        f"{args.warmup} small requests before, {args.small} after",
        f"RSS: VmRSS of the gateway's process (and any children) from /proc; upstream: "
        f"`bench/bigbody/upstream.py` (a fixed answer); one tier, no Redis, no tracing; "
        f"extra gateway environment: {extra_env}",
        level,
        f"load average (1/5/15 min): {load_before} before, {load_after} after",
    ]
    publish(
        result=markdown_table(columns, rows),
        notes=notes,
        head=section_head("bigbody", WHAT, started, command),
        pinning=f"gateway on cpu {args.gateway_cpu}; upstream and client on cpu {args.load_cpu}",
        no_record=args.no_record,
    )


if __name__ == "__main__":
    sys.exit(main())
