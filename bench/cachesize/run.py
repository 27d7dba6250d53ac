"""Redis memory per cached response, for the sizing note in deploy/README.md.

Starts Redis, the simulator and one gateway, fills the response cache with
``--entries`` distinct ``temperature: 0`` answers of ``--tokens`` tokens each
(every request a miss, so each stores one entry), then sums Redis's own
``MEMORY USAGE`` (key, value and per-key overhead) over the cache's keys and
prints it per key. (``used_memory`` deltas were tried first: the gateway's
connection buffers and Redis's table growth swamp entries of a few hundred
bytes, so they measured nothing.) Both figures grow
with answer length; run it with the answer sizes you expect. Unless
``--no-record``, the table becomes the ``cachesize`` section of
``bench/RESULTS.md``.

    .venv/bin/python bench/cachesize/run.py [--entries 2000] [--tokens 50 200 1000] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import HOST
from bench.lib.procs import Procs, guarded
from bench.lib.redis_server import redis_version, start_redis
from bench.lib.report import command_line, markdown_table, publish, section_head
from bench.lib.stack import MODEL, gateway_config, start_gateway, start_sim, wait_gateway, wait_sim

KEY = "sk-bench-cachesize-0001"


def cache_entries(port: int) -> tuple[int, int]:
    """How many response-cache keys Redis holds, and their ``MEMORY USAGE`` summed."""
    with redis.Redis(host=HOST, port=port) as client:
        keys = list(client.scan_iter(match="tollway:cache:*", count=1000))
        return len(keys), sum(int(client.memory_usage(key, samples=0) or 0) for key in keys)


def settled_entries(port: int, stored: int, timeout: float = 10.0) -> tuple[int, int]:
    """``cache_entries`` once every miss's entry has landed (the gateway stores an answer
    in the background after sending it), or as they are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    keys, used = cache_entries(port)
    while keys < stored and time.monotonic() < deadline:
        time.sleep(0.2)
        keys, used = cache_entries(port)
    return keys, used


async def fill(url: str, entries: int, tokens: int, tag: str) -> int:
    headers = {"authorization": f"Bearer {KEY}"}
    stored = 0
    async with aiohttp.ClientSession() as session:
        for start in range(0, entries, 32):
            batch = range(start, min(start + 32, entries))

            async def one(i: int) -> bool:
                question = {"role": "user", "content": f"{tag} question {i}"}
                body = {"model": MODEL, "max_tokens": tokens, "temperature": 0,
                        "messages": [question]}  # fmt: skip
                async with session.post(url, json=body, headers=headers) as response:
                    await response.read()
                    return response.status == 200 and response.headers["x-tollway-cache"] == "miss"

            stored += sum(await asyncio.gather(*(one(i) for i in batch)))
    return stored


def measure(procs: Procs, tmp: Path, args: argparse.Namespace) -> None:
    started = dt.datetime.now(dt.UTC)
    redis_server = start_redis(procs, tmp, 1)
    rows = []
    for tokens in args.tokens:
        engine = [
            "--zero-delay",
            "--output-tokens-min",
            str(tokens),
            "--output-tokens-max",
            str(tokens),
        ]
        sim = start_sim(procs, tmp, 1, engine)
        wait_sim(sim, 1)
        config = gateway_config(
            sim, [{"key": KEY, "tenant": "bench"}], redis={"url": redis_server.url},
            cache={"local_ttl_s": 0},  # metering stays on: with it off nothing is cached
        )  # fmt: skip
        gateway = start_gateway(procs, tmp, 0, config, name=f"gateway-{tokens}")
        wait_gateway(gateway, 0)
        with redis.Redis(host=HOST, port=redis_server.port) as client:
            client.flushdb()
        stored = asyncio.run(fill(gateway.chat_url, args.entries, tokens, f"t{tokens}"))
        keys, used = settled_entries(redis_server.port, stored)
        rows.append((tokens, stored, keys, used / max(keys, 1)))
        procs.stop(gateway.proc)
        procs.stop(sim.proc)
    columns = [
        ("answer tokens", "r"), ("misses sent", "r"), ("cache keys in Redis", "r"),
        ("MEMORY USAGE per key, bytes", "r"),
    ]  # fmt: skip
    result = markdown_table(
        columns,
        [
            [str(tokens), f"{stored:,}", f"{keys:,}", f"{per:,.0f}"]
            for tokens, stored, keys, per in rows
        ],
    )
    notes = [
        "one gateway (metering on: with it off nothing is cached; the in-process cache layer "
        "off) in front of `tollway sim --zero-delay` with fixed answer lengths; every request "
        "a distinct `temperature: 0` miss, so each stores one entry; Redis flushed before each "
        "size; the figure is Redis's own `MEMORY USAGE` (key, value, per-key overhead) summed "
        "over the `tollway:cache:*` keys",
        "the simulator's text compresses far better than real prose: add the answers' "
        "compressed size for real traffic",
    ]
    publish(
        result=result,
        notes=notes,
        head=section_head(
            "cachesize",
            "Redis memory per cached response, for the sizing note in deploy/README.md.",
            started,
            command_line(),
            [redis_version()],
        ),
        pinning="gateway on cpu 0; simulator and Redis on cpu 1",
        no_record=args.no_record,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument(
        "--no-record", action="store_true", help="print only; leave RESULTS.md as it is"
    )
    args = parser.parse_args()
    return guarded("cachesize", lambda procs, tmp: measure(procs, tmp, args))


if __name__ == "__main__":
    sys.exit(main())
