"""Streaming load for bench/overload: open-loop arrivals (or a closed loop), TTFT per request.

wrk cannot see the first token of an SSE stream, so this is an asyncio +
aiohttp client. Run it as its own process, pinned (the runner does)::

    python -m bench.overload.loadgen --url URL --key KEY --model M --out FILE \\
        (--rate R | --concurrency N) --duration S [--watch NAME=URL@METRIC ...]

- **Open loop** (``--rate``): Poisson arrivals at the given rate for
  ``--duration`` seconds (seeded: both sides of a comparison get the same
  schedule). A request leaves at its time whatever happened to the earlier
  ones, so overload shows up as queueing instead of being absorbed by a
  slower client. Latencies count from the scheduled time; how late requests
  left is reported, to show the generator kept up.
- **Closed loop** (``--concurrency``): that many clients, each sending its
  next request when the previous one ends; for measuring capacity.
- After the window, requests still running get ``--drain-timeout`` seconds
  to finish; what is left then is cancelled and counted as unfinished.
  There is no other client-side timeout.
- ``--watch``: Prometheus gauges polled every ``--watch-interval`` s while
  the run lasts (summed over labels); the highest value seen is reported.

Every request is a streamed chat completion with a unique prompt (no cache
hits, no prefix-cache help). The result is one JSON file (``LoadResult``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.overload.records import LoadResult, Record


def arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, duration) at ``rate`` per second."""
    rng = random.Random(seed)
    times: list[float] = []
    at = rng.expovariate(rate)
    while at < duration:
        times.append(at)
        at += rng.expovariate(rate)
    return times


def has_content(payload: bytes) -> bool:
    """Whether one SSE data payload carries generated text (not the role chunk, not usage)."""
    try:
        event = json.loads(payload)
    except ValueError:
        return False
    for choice in event.get("choices") or ():
        text = (choice.get("delta") or {}).get("content") or choice.get("text")
        if text:
            return True
    return False


def gauge_value(text: str, metric: str) -> float | None:
    """The sum of a Prometheus metric's samples over all label sets; None if absent."""
    total: float | None = None
    for line in text.splitlines():
        if line.startswith(metric) and line[len(metric) : len(metric) + 1] in ("{", " "):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


@dataclass(frozen=True)
class Watch:
    name: str
    url: str
    metric: str

    @classmethod
    def parse(cls, spec: str) -> Watch:
        name, rest = spec.split("=", 1)
        url, metric = rest.rsplit("@", 1)
        return cls(name, url, metric)


class Client:
    def __init__(self, session: aiohttp.ClientSession, args: argparse.Namespace):
        self.session = session
        self.url = args.url
        self.headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
        self.model = args.model
        self.max_tokens = args.max_tokens
        self.nonce = secrets.token_hex(4)
        self.count = 0

    def body(self) -> bytes:
        self.count += 1
        prompt = f"overload {self.nonce}-{self.count}: tell me something about queues"
        return json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens,
                "stream": True,
            }
        ).encode()

    async def send(self, record: Record, scheduled: float) -> None:
        """Fill ``record`` in as the answer arrives; times from ``scheduled`` (loop time)."""
        loop = asyncio.get_running_loop()
        try:
            async with self.session.post(self.url, data=self.body(), headers=self.headers) as resp:
                record.status = resp.status
                if resp.status != 200:
                    await resp.read()
                    record.total_s = loop.time() - scheduled
                    record.kind = "shed" if resp.status == 429 else "error"
                    record.retry_after = resp.headers.get("Retry-After")
                    return
                done = failed = False
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    if payload.startswith(b'{"error"'):
                        failed = True
                    elif record.ttft_s is None and has_content(payload):
                        record.ttft_s = loop.time() - scheduled
                record.total_s = loop.time() - scheduled
                ok = done and not failed and record.ttft_s is not None
                record.kind = "ok" if ok else "error"
                if not ok:
                    record.error = "error event" if failed else "stream ended early"
        except (aiohttp.ClientError, OSError) as exc:
            record.total_s = loop.time() - scheduled
            record.kind = "error"
            record.error = type(exc).__name__


async def watch(
    session: aiohttp.ClientSession,
    watches: list[Watch],
    interval: float,
    seen: dict[str, float],
    stop: asyncio.Event,
) -> int:
    """Poll the gauges until ``stop``; keeps the highest of each in ``seen``; returns rounds."""
    rounds = 0
    while not stop.is_set():
        for w in watches:
            try:
                async with session.get(w.url) as resp:
                    value = gauge_value(await resp.text(), w.metric)
            except (aiohttp.ClientError, OSError):
                continue
            if value is not None:
                seen[w.name] = max(seen.get(w.name, value), value)
        rounds += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return rounds


async def open_loop(
    client: Client, args: argparse.Namespace
) -> tuple[list[Record], list[float], float]:
    """Records, send lags and this process's CPU seconds over the arrival window."""
    loop = asyncio.get_running_loop()
    schedule = arrivals(args.rate, args.duration, args.seed)
    records: list[Record] = []
    tasks: list[asyncio.Task[None]] = []
    lags: list[float] = []
    start = loop.time()
    cpu = time.process_time()
    for at in schedule:
        scheduled = start + at
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, loop.time() - scheduled))
        record = Record(at_s=at)
        records.append(record)
        tasks.append(asyncio.create_task(client.send(record, scheduled)))
    remaining = start + args.duration - loop.time()
    if remaining > 0:
        await asyncio.sleep(remaining)
    cpu = time.process_time() - cpu
    await finish(tasks, args.drain_timeout)
    return records, lags, cpu


async def closed_loop(client: Client, args: argparse.Namespace) -> list[Record]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + args.duration
    records: list[Record] = []

    async def worker() -> None:
        while loop.time() < end:
            now = loop.time()
            record = Record(at_s=now - start)
            records.append(record)
            await client.send(record, now)

    await finish([asyncio.create_task(worker()) for _ in range(args.concurrency)],
                 args.duration + args.drain_timeout)  # fmt: skip
    return records


async def finish(tasks: Sequence[asyncio.Task[None]], limit_s: float) -> None:
    """Wait for ``tasks`` up to ``limit_s``; cancel the rest (their records stay unfinished)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def run(args: argparse.Namespace) -> LoadResult:
    connector = aiohttp.TCPConnector(limit=0)  # one connection per request in flight
    timeout = aiohttp.ClientTimeout(total=None, connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, args)
        seen: dict[str, float] = {}
        stop = asyncio.Event()
        watches = [Watch.parse(spec) for spec in args.watch]
        watcher = asyncio.create_task(watch(session, watches, args.watch_interval, seen, stop))
        lags: list[float] = []
        cpu = 0.0
        try:
            if args.rate:
                records, lags, cpu = await open_loop(client, args)
            else:
                records = await closed_loop(client, args)
        finally:
            stop.set()
            rounds = await watcher
    lags.sort()
    return LoadResult(
        mode="open" if args.rate else "closed",
        duration_s=args.duration,
        records=records,
        send_lag_p99_s=lags[int(0.99 * (len(lags) - 1))] if lags else 0.0,
        send_lag_max_s=lags[-1] if lags else 0.0,
        cpu_s=cpu,
        watch_max=seen,
        watch_samples=rounds,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="chat completions URL")
    parser.add_argument("--key", default="sk-bench")
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    how.add_argument("--concurrency", type=int, help="closed loop: clients")
    parser.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=0, help="of the arrival schedule")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--watch", action="append", default=[], help="NAME=URL@METRIC")
    parser.add_argument("--watch-interval", type=float, default=0.2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    args.out.write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
