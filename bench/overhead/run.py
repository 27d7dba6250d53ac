"""The gateway's own cost: tollway vs the same upstream called directly, in one run.

Pins the gateway to one core and the load generator (wrk) plus the upstream
(the simulator with ``--zero-delay``) to the other, then measures, alternating
direct and gateway runs:

- throughput at 16 connections (wrk ``-t1 -c16``), non-streaming;
- latency at 1 connection (p50/p99), non-streaming, and the latency the
  gateway adds over the direct path;
- throughput at 16 connections, streaming (secondary);
- the gateway's CPU time per request (utime+stime from /proc/PID/stat).

Every request has a unique prompt (see ``unique.lua``). Prints a Markdown table
and, unless ``--no-record``, appends it to ``bench/RESULTS.md`` with the date,
command, commit and machine. ``--profile`` adds a py-spy run against the
gateway and prints where its CPU time goes. See ``bench/overhead/README.md``.

    .venv/bin/python bench/overhead/run.py [--duration 10] [--connections 16]
        [--repeats 2] [--no-record] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LUA = HERE / "unique.lua"
RESULTS = REPO / "bench" / "RESULTS.md"
PYSPY_VENV = Path("/tmp/tollway-pyspy")
HOST = "127.0.0.1"
MODEL = "bench-model"
API_KEY = "sk-tollway-bench-overhead"
CLK_TCK = os.sysconf("SC_CLK_TCK")

THROUGHPUT_GOAL_RPS = 2000.0
ADDED_P50_GOAL_MS = 0.6


class BenchError(Exception):
    """The benchmark could not produce a trustworthy number."""


# ---------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the runner dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; kept across exec


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text)


@dataclass
class Procs:
    """Every process the benchmark starts; ``stop_all`` leaves none behind."""

    items: list[Proc] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], log: Path | None, *, new_session: bool = True
    ) -> Proc:
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = log.open("wb")
        try:
            popen = subprocess.Popen(
                list(argv),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
                preexec_fn=_die_with_parent,  # safe: this process runs no threads
            )
        finally:
            if not isinstance(out, int):
                out.close()
        proc = Proc(name, popen, log)
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.terminate()
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        # Newest first: wrk/py-spy, then the gateway, then the upstream.
        for proc in reversed(list(self.items)):
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"warning: could not stop {proc.name} (pid {proc.pid}): {exc}")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    print(f"\n{signal.Signals(signum).name}; stopping everything this benchmark started")
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {API_KEY}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def wait_ready(proc: Proc, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} before {url} answered:\n"
                + proc.log_tail()
            )
        try:
            status, _, _ = http("GET", url, timeout=1.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        time.sleep(0.1)
    raise BenchError(f"{proc.name}: {url} not ready after {timeout:.0f} s ({last})")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times(cpus: Sequence[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per cpu since boot, from /proc/stat."""
    times: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def check_pinned(proc: Proc, cpu: int) -> None:
    affinity = os.sched_getaffinity(proc.pid)
    if affinity != {cpu}:
        raise BenchError(f"{proc.name} (pid {proc.pid}) runs on cpus {affinity}, not {{{cpu}}}")


# ---------------------------------------------------------------- tools


def run_quiet(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("wrk is not installed and this is not root: apt-get install wrk")
    print("installing wrk with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"apt-get install wrk failed:\n{done.stderr[-2000:]}")
    found = shutil.which("wrk")
    if not found:
        raise BenchError("wrk still not on PATH after apt-get install wrk")
    return found


def ensure_pyspy() -> str:
    found = shutil.which("py-spy")
    if found:
        return found
    local = PYSPY_VENV / "bin" / "py-spy"
    if local.exists():
        return str(local)
    print(f"installing py-spy into {PYSPY_VENV} ...", flush=True)
    steps = [
        ["python3", "-m", "venv", str(PYSPY_VENV)],
        [str(PYSPY_VENV / "bin" / "pip"), "install", "-q", "py-spy"],
    ]
    for step in steps:
        done = run_quiet(step)
        if done.returncode != 0:
            raise BenchError(f"{shlex.join(step)} failed:\n{done.stderr[-2000:]}")
    return str(local)


def tollway_bin() -> str:
    beside = Path(sys.executable).parent / "tollway"
    if beside.exists():
        return str(beside)
    venv = REPO / ".venv" / "bin" / "tollway"
    if venv.exists():
        return str(venv)
    raise BenchError("no tollway executable: run scripts/bootstrap.sh, then use .venv/bin/python")


# ---------------------------------------------------------------- wrk


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    connections: int
    stream: bool


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    target: str  # "direct" or "gateway"
    requests: int
    duration_s: float
    p50_us: int
    p99_us: int
    gateway_cpu_s: float | None
    upstream_cpu_s: float
    gateway_core_busy: float  # whole core, every process on it
    load_core_busy: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def gateway_cpu_us_per_request(self) -> float | None:
        if self.gateway_cpu_s is None or not self.requests:
            return None
        return self.gateway_cpu_s * 1e6 / self.requests

    @property
    def gateway_busy(self) -> float | None:
        return None if self.gateway_cpu_s is None else self.gateway_cpu_s / self.duration_s


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Procs
    wrk_path: str
    sim: Proc
    gateway: Proc
    urls: dict[str, str]
    runs: list[Run] = field(default_factory=list)

    def wrk_argv(self, url: str, connections: int, duration: float, stream: bool) -> list[str]:
        nonce = secrets.token_hex(6)
        return [
            "taskset",
            "-c",
            str(self.args.load_cpu),
            self.wrk_path,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url,
            "--",
            MODEL,
            API_KEY,
            nonce,
            "1" if stream else "0",
            str(self.args.max_tokens),
        ]

    def wrk(self, url: str, connections: int, duration: float, stream: bool) -> dict[str, Any]:
        argv = self.wrk_argv(url, connections, duration, stream)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=duration + 60,
                check=False,
                preexec_fn=_die_with_parent,  # safe: this process runs no threads
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"wrk did not finish: {shlex.join(argv)}") from exc
        if done.returncode != 0:
            raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        line = next(
            (ln for ln in done.stdout.splitlines() if ln.startswith("TOLLWAY_BENCH ")), None
        )
        if line is None:
            raise BenchError(f"no TOLLWAY_BENCH line from wrk's done() hook:\n{done.stdout}")
        stats: dict[str, Any] = json.loads(line.removeprefix("TOLLWAY_BENCH "))
        non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", done.stdout)
        socket_errors = re.search(r"Socket errors:.*", done.stdout)
        failed = {
            k: stats[k]
            for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
            if stats[k]
        }
        if non2xx or failed or socket_errors:
            raise BenchError(
                f"{url}: errors during the run {failed or ''}"
                f"{' / ' + non2xx.group(0) if non2xx else ''}"
                f"{' / ' + socket_errors.group(0) if socket_errors else ''}; "
                "the numbers would be meaningless.\n"
                f"wrk output:\n{done.stdout}\ngateway log:\n{self.gateway.log_tail()}\n"
                f"simulator log:\n{self.sim.log_tail()}"
            )
        if stats["sent"] < stats["requests"]:
            raise BenchError(f"{url}: fewer prompts built than responses counted: {stats}")
        if stats["requests"] == 0:
            raise BenchError(f"{url}: wrk completed no requests:\n{done.stdout}")
        return stats

    def measure(self, scenario: Scenario, target: str, duration: float) -> Run:
        cores = (self.args.gateway_cpu, self.args.load_cpu)
        cores_before = cpu_times(cores)
        gw_before = cpu_seconds(self.gateway.pid)
        sim_before = cpu_seconds(self.sim.pid)
        stats = self.wrk(self.urls[target], scenario.connections, duration, scenario.stream)
        gw_cpu = cpu_seconds(self.gateway.pid) - gw_before
        sim_cpu = cpu_seconds(self.sim.pid) - sim_before
        cores_after = cpu_times(cores)
        core_busy = {c: busy_fraction(cores_before[c], cores_after[c]) for c in cores}
        run = Run(
            scenario=scenario,
            target=target,
            requests=int(stats["requests"]),
            duration_s=stats["duration_us"] / 1e6,
            p50_us=int(stats["p50_us"]),
            p99_us=int(stats["p99_us"]),
            gateway_cpu_s=gw_cpu if target == "gateway" else None,
            upstream_cpu_s=sim_cpu,
            gateway_core_busy=core_busy[self.args.gateway_cpu],
            load_core_busy=core_busy[self.args.load_cpu],
        )
        self.runs.append(run)
        cpu = run.gateway_cpu_us_per_request
        gw_busy = run.gateway_busy
        print(
            f"  {scenario.label:<18} {target:<8} {run.rps:7.0f} req/s  "
            f"p50 {run.p50_us / 1000:7.3f} ms  p99 {run.p99_us / 1000:7.3f} ms  "
            + (f"gateway {cpu:5.0f} us CPU/req  " if cpu is not None else "")
            + f"cpu{self.args.gateway_cpu} {100 * run.gateway_core_busy:3.0f}% busy"
            + (f" (gateway {100 * gw_busy:3.0f}%)" if gw_busy is not None else "")
            + f"  cpu{self.args.load_cpu} {100 * run.load_core_busy:3.0f}% busy",
            flush=True,
        )
        return run


# ---------------------------------------------------------------- setup


def write_config(path: Path, sim_port: int) -> None:
    config = {
        "listen": {"host": HOST, "port": 8080},  # the port is overridden by --port
        "auth": {"keys": [{"key": API_KEY, "tenant": "bench"}]},
        "tiers": [
            {
                "name": "bench",
                "models": [MODEL],
                "replicas": [
                    {
                        "url": f"http://{HOST}:{sim_port}",
                        "max_num_seqs": 256,
                        "gpu_hourly_usd": 1.0,
                    }
                ],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def sanity_check(urls: dict[str, str]) -> None:
    """One plain and one streamed request each way, before any timing."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"sanity {secrets.token_hex(4)}"}],
        "max_tokens": 4,
    }
    for target, url in urls.items():
        status, headers, data = http("POST", url, body)
        if status != 200 or not json.loads(data).get("choices"):
            raise BenchError(f"{target}: POST {url} answered {status}: {data[:500]!r}")
        if target == "gateway" and "x-tollway-tier" not in headers:
            raise BenchError(f"gateway answered without x-tollway-tier; is it the gateway? {url}")
        status, _, data = http("POST", url, {**body, "stream": True})
        if status != 200 or b"data: [DONE]" not in data:
            raise BenchError(f"{target}: streamed POST {url} answered {status}: {data[:500]!r}")


def start_stack(args: argparse.Namespace, procs: Procs, tmp: Path, wrk: str) -> Bench:
    tollway = tollway_bin()
    sim_port, gw_port = free_port(), free_port()
    sim = procs.start(
        "simulator",
        [
            "taskset", "-c", str(args.load_cpu), tollway, "sim",
            "--host", HOST, "--port", str(sim_port), "--model", MODEL,
            "--zero-delay", "--shutdown-timeout", "1",
        ],
        tmp / "sim.log",
    )  # fmt: skip
    config = tmp / "tollway.yaml"
    write_config(config, sim_port)
    gateway = procs.start(
        "gateway",
        [
            "taskset", "-c", str(args.gateway_cpu), tollway, "serve",
            "--config", str(config), "--host", HOST, "--port", str(gw_port),
            "--log-level", "warning", "--drain-timeout", "1",
        ],
        tmp / "gateway.log",
    )  # fmt: skip
    wait_ready(sim, f"http://{HOST}:{sim_port}/health")
    wait_ready(gateway, f"http://{HOST}:{gw_port}/health")
    wait_ready(gateway, f"http://{HOST}:{gw_port}/ready")  # the replica is healthy
    check_pinned(sim, args.load_cpu)
    check_pinned(gateway, args.gateway_cpu)
    urls = {
        "direct": f"http://{HOST}:{sim_port}/v1/chat/completions",
        "gateway": f"http://{HOST}:{gw_port}/v1/chat/completions",
    }
    sanity_check(urls)
    return Bench(args, procs, wrk, sim, gateway, urls)


# ---------------------------------------------------------------- profile


FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
ADDRESS = re.compile(r"^0x[0-9a-fA-F]+ ")
EVENT_LOOP_NOTE = (
    "note: without --profile-native, own time in `Runner.run (asyncio/runners.py)` is "
    "uvloop's C event loop (epoll, socket reads and writes, httptools parsing) with no "
    "Python frame above it; --profile-native splits it into C functions"
)


def summarise_profile(raw: Path, top: int) -> str:
    """Top functions by own and cumulative samples from py-spy's raw (collapsed) output.

    Each raw line is ``root;...;leaf COUNT``. Own time counts the leaf frame;
    cumulative time counts every distinct frame on the stack once. Frames on
    every sample (the entry point down to the event loop) are left out of the
    cumulative table: they are 100% by construction.
    """
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [ADDRESS.sub("<native> ", f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
        by_package[_package(frames[-1])] += count
    if not total:
        return "py-spy recorded no samples (is ptrace allowed? try running as root)"
    trunk = sorted(f for f, c in cumulative.items() if c == total)
    for frame in trunk:
        del cumulative[frame]

    def table(title: str, counts: Counter[str]) -> list[str]:
        lines = [f"{title}:", f"  {'% samples':>9}  {'samples':>7}  function (file)"]
        for name, count in counts.most_common(top):
            lines.append(f"  {100 * count / total:8.1f}%  {count:7d}  {name}")
        return lines

    out = [
        f"py-spy: {total} samples of the gateway process (idle excluded; a thread that is "
        "runnable but preempted by another process still counts)"
    ]
    out += table(f"top {top} by own time (leaf frame)", own)
    out += table(f"top {top} by cumulative time (on the stack)", cumulative)
    out.append(f"  (left out, on every sample: {len(trunk)} frames from the entry point down)")
    out += table("own time by package", by_package)
    out.append(EVENT_LOOP_NOTE)
    return "\n".join(out)


def _package(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    if not path.endswith(".py") and "/" not in path and not path.startswith("<"):
        return f"native: {path}"  # --profile-native: a C source file or a shared library
    parts = [p for p in path.split("/") if p and p != "site-packages"]
    if not parts:
        return path
    head = parts[0]
    return head if len(parts) > 1 else head.removesuffix(".py")


def profile(bench: Bench, tmp: Path) -> str:
    pyspy = ensure_pyspy()
    raw = tmp / "pyspy.raw"
    args = bench.args
    spy = bench.procs.start(
        "py-spy",
        [
            "taskset", "-c", str(args.load_cpu), pyspy, "record",
            "--pid", str(bench.gateway.pid), "--rate", str(args.profile_rate),
            "--format", "raw", "--nolineno", "--output", str(raw),
            *(["--native"] if args.profile_native else []),
        ],
        tmp / "pyspy.log",
        new_session=False,
    )  # fmt: skip
    time.sleep(1.0)  # let py-spy attach before the load starts
    if spy.popen.poll() is not None:
        raise BenchError(f"py-spy exited early ({spy.popen.returncode}):\n{spy.log_tail()}")
    stats = bench.wrk(bench.urls["gateway"], args.connections, args.duration, stream=False)
    spy.popen.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        spy.popen.wait(30)
    finally:
        bench.procs.stop(spy)
    if not raw.exists():
        raise BenchError(f"py-spy wrote no output:\n{spy.log_tail()}")
    rps = stats["requests"] / (stats["duration_us"] / 1e6)
    header = (
        f"profiled run ({args.connections} conns, {args.duration} s, gateway under py-spy at "
        f"{args.profile_rate} Hz{', native' if args.profile_native else ''}, so slower than "
        f"unprofiled): {rps:.0f} req/s"
    )
    return header + "\n" + summarise_profile(raw, args.profile_top)


# ---------------------------------------------------------------- report


def ms(us: float | None, signed: bool = False) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:+.3f}" if signed else f"{us / 1000:.3f}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    target: str
    rps: float
    p50_us: float
    p99_us: float
    added_p50_us: float | None
    added_p99_us: float | None
    cpu_us: float | None
    busy: float | None
    goal: str
    met: str


def summarise(runs: list[Run], scenarios: list[Scenario]) -> list[Row]:
    rows: list[Row] = []
    for scenario in scenarios:
        medians: dict[str, tuple[float, float, float]] = {}
        for target in ("direct", "gateway"):
            mine = [r for r in runs if r.scenario == scenario and r.target == target]
            if not mine:
                continue
            rps = median([r.rps for r in mine])
            p50 = median([r.p50_us for r in mine])
            p99 = median([r.p99_us for r in mine])
            medians[target] = (rps, p50, p99)
            cpu = busy = added_p50 = added_p99 = None
            goal = met = "-"
            if target == "gateway":
                cpu = median([r.gateway_cpu_us_per_request or 0.0 for r in mine])
                busy = median([r.gateway_busy or 0.0 for r in mine])
                if "direct" in medians:
                    added_p50 = p50 - medians["direct"][1]
                    added_p99 = p99 - medians["direct"][2]
                if scenario.key == "throughput":
                    goal = f">= {THROUGHPUT_GOAL_RPS:,.0f} req/s"
                    met = "yes" if rps >= THROUGHPUT_GOAL_RPS else "no"
                elif scenario.key == "latency" and added_p50 is not None:
                    goal = f"added p50 <= {ADDED_P50_GOAL_MS} ms"
                    met = "yes" if added_p50 <= ADDED_P50_GOAL_MS * 1000 else "no"
            rows.append(
                Row(scenario, target, rps, p50, p99, added_p50, added_p99, cpu, busy, goal, met)
            )
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| scenario | path | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| gateway CPU µs/req | gateway % of its core | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.scenario.label} | {row.target} | {row.rps:,.0f} | {ms(row.p50_us)} "
            f"| {ms(row.p99_us)} | {ms(row.added_p50_us, True)} | {ms(row.added_p99_us, True)} "
            f"| {'-' if row.cpu_us is None else f'{row.cpu_us:.0f}'} "
            f"| {'-' if row.busy is None else f'{100 * row.busy:.0f}%'} "
            f"| {row.goal} | {row.met} |"
        )
    return "\n".join(lines)


def per_run_lines(runs: list[Run]) -> str:
    lines = []
    for run in runs:
        cpu = run.gateway_cpu_us_per_request
        lines.append(
            f"- {run.scenario.label}, {run.target}: {run.rps:,.0f} req/s, "
            f"p50 {ms(run.p50_us)} ms, p99 {ms(run.p99_us)} ms"
            + (f", gateway {cpu:.0f} µs CPU/req" if cpu is not None else "")
            + f", gateway core {100 * run.gateway_core_busy:.0f}% busy"
            + (f" (gateway {100 * run.gateway_busy:.0f}%)" if run.gateway_busy is not None else "")
            + f", load core {100 * run.load_core_busy:.0f}% busy"
            + f", simulator {run.upstream_cpu_s * 1e6 / run.requests:.0f} µs CPU/req"
        )
    return "\n".join(lines)


def bottleneck_note(runs: list[Run], args: argparse.Namespace) -> str | None:
    """What limited the gateway's throughput runs: the gateway, the load core, or others."""
    mine = [r for r in runs if r.scenario.key == "throughput" and r.target == "gateway"]
    if not mine:
        return None
    gateway = median([r.gateway_busy or 0.0 for r in mine])
    core = median([r.gateway_core_busy for r in mine])
    load = median([r.load_core_busy for r in mine])
    where = (
        f"in the gateway {args.connections}-conn runs the gateway used {100 * gateway:.0f}% "
        f"of cpu{args.gateway_cpu} (whole core {100 * core:.0f}% busy), cpu{args.load_cpu} "
        f"(wrk + simulator) was {100 * load:.0f}% busy"
    )
    if gateway >= 0.9:
        return f"{where}: the gateway's core was the limit, as intended"
    if core - gateway >= 0.1:
        return (
            f"{where}: other processes took {100 * (core - gateway):.0f}% of the gateway's "
            "core; the machine is not quiet, so the gateway's figures are pessimistic"
        )
    if load >= 0.9:
        return (
            f"{where}: the load core was the limit, so the gateway's requests/s is a lower "
            "bound (the direct row shows that core's ceiling)"
        )
    return f"{where}: neither core was saturated; look for another limit"


def git_commit() -> str:
    head = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    status = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    changed = [ln for ln in status.stdout.splitlines() if ln.strip()]
    suffix = f" (dirty: {len(changed)} tracked files modified)" if changed else ""
    return head.stdout.strip() + suffix


def machine_facts() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = run_quiet(["wrk", "-v"]).stdout.splitlines()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "wrk": wrk_version[0].split(" Copyright")[0] if wrk_version else "unknown",
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line() -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), *sys.argv])


def record(section: str) -> None:
    if not RESULTS.exists():
        raise BenchError(f"{RESULTS} is missing; it holds the header that explains the log")
    with RESULTS.open("a") as out:
        out.write("\n" + section)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=16, help="for the throughput runs")
    parser.add_argument("--repeats", type=int, default=2, help="runs per scenario and path")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per path")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming row")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway afterwards")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: also C frames (uvloop, httptools, libc), to split the event loop",
    )
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1, help="wrk and the simulator")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeats < 1 or args.connections < 1:
        parser.error("--duration, --repeats and --connections must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    allowed = os.sched_getaffinity(0)
    if args.gateway_cpu == args.load_cpu or not {args.gateway_cpu, args.load_cpu} <= allowed:
        print(
            f"error: need two distinct cpus from {sorted(allowed)} "
            f"(--gateway-cpu {args.gateway_cpu}, --load-cpu {args.load_cpu})",
            file=sys.stderr,
        )
        return 2
    command = command_line()
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="tollway-overhead-"))
    keep_tmp = False
    try:
        execute(args, procs, tmp, command)
    except BenchError as exc:
        keep_tmp = True
        print(f"\nbench/overhead FAILED: {exc}\n(logs kept in {tmp})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything this benchmark started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def execute(args: argparse.Namespace, procs: Procs, tmp: Path, command: str) -> None:
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    wrk = ensure_wrk()
    if args.profile:
        ensure_pyspy()
    bench = start_stack(args, procs, tmp, wrk)
    scenarios = [
        Scenario("throughput", f"{args.connections} conns", args.connections, False),
        Scenario("latency", "1 conn", 1, False),
    ]
    if not args.no_stream:
        scenarios.append(
            Scenario("stream", f"{args.connections} conns, stream", args.connections, True)
        )
    print(
        f"gateway pid {bench.gateway.pid} on cpu {args.gateway_cpu}; simulator pid "
        f"{bench.sim.pid} and wrk on cpu {args.load_cpu}; load average {load_before}",
        flush=True,
    )
    print(f"warming up ({args.warmup:.0f} s per path) ...", flush=True)
    for target in ("direct", "gateway"):
        bench.wrk(bench.urls[target], args.connections, args.warmup, stream=False)
    print(f"measuring: {args.repeats} x {args.duration:.0f} s per scenario and path", flush=True)
    for _ in range(args.repeats):
        for scenario in scenarios:
            for target in ("direct", "gateway"):
                bench.measure(scenario, target, args.duration)
    profile_text = profile(bench, tmp) if args.profile else None
    load_after = load_average()
    rows = summarise(bench.runs, scenarios)
    table = markdown_table(rows)
    notes = [
        f"load average (1/5/15 min): {load_before} before, {load_after} after",
        "medians of "
        f"{args.repeats} alternating runs of {args.duration} s; unique prompts; "
        f"max_tokens {args.max_tokens}; upstream = `tollway sim --zero-delay`",
    ]
    bottleneck = bottleneck_note(bench.runs, args)
    if bottleneck:
        notes.append(bottleneck)
    print()
    print(table)
    print()
    for note in notes:
        print(f"- {note}")
    if profile_text:
        print()
        print(profile_text)
    if not args.no_record:
        facts = machine_facts()
        section = "\n".join(
            [
                f"## {started:%Y-%m-%d %H:%M} UTC: overhead (gateway vs direct)",
                "",
                f"- command: `{command}`",
                f"- commit: {git_commit()}",
                f"- machine: nproc {facts['nproc']}, {facts['cpu']}, {facts['kernel']}, "
                f"Python {facts['python']}, {facts['wrk']}",
                f"- pinning: gateway on cpu {args.gateway_cpu}; wrk and simulator on "
                f"cpu {args.load_cpu}",
                *(f"- {note}" for note in notes),
                "",
                table,
                "",
                "<details><summary>individual runs</summary>",
                "",
                per_run_lines(bench.runs),
                "",
                "</details>",
                "",
            ]
        )
        if profile_text:
            section += "\n```\n" + profile_text + "\n```\n"
        record(section)
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
