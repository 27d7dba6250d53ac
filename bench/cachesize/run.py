"""Redis memory per cached response, for the sizing note in deploy/README.md.

Starts Redis, the simulator and one gateway, fills the response cache with
``--entries`` distinct ``temperature: 0`` answers of ``--tokens`` tokens each
(every request a miss, so each stores one entry), then sums Redis's own
``MEMORY USAGE`` (key, value and per-key overhead) over the cache's keys and
prints it per key. (``used_memory`` deltas were tried first: the gateway's
connection buffers and Redis's table growth swamp entries of a few hundred
bytes, so they measured nothing.) Both figures grow
with answer length; run it with the answer sizes you expect.

    .venv/bin/python bench/cachesize/run.py [--entries 2000] [--tokens 50 200 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import HOST
from bench.lib.procs import Procs, guarded
from bench.lib.redis_server import start_redis
from bench.lib.stack import MODEL, gateway_config, start_gateway, start_sim, wait_gateway, wait_sim

KEY = "sk-bench-cachesize-0001"


def cache_entries(port: int) -> tuple[int, int]:
    """How many response-cache keys Redis holds, and their ``MEMORY USAGE`` summed."""
    with redis.Redis(host=HOST, port=port) as client:
        keys = list(client.scan_iter(match="tollway:cache:*", count=1000))
        return len(keys), sum(int(client.memory_usage(key, samples=0) or 0) for key in keys)


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


def measure(procs: Procs, tmp: Path, entries: int, token_sizes: list[int]) -> None:
    redis_server = start_redis(procs, tmp, 1)
    rows = []
    for tokens in token_sizes:
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
        stored = asyncio.run(fill(gateway.chat_url, entries, tokens, f"t{tokens}"))
        keys, used = cache_entries(redis_server.port)
        rows.append((tokens, stored, keys, used / max(keys, 1)))
        procs.stop(gateway.proc)
        procs.stop(sim.proc)
    print("| answer tokens | misses sent | cache keys in Redis | MEMORY USAGE per key, bytes |")
    print("|---:|---:|---:|---:|")
    for tokens, stored, keys, per in rows:
        print(f"| {tokens} | {stored:,} | {keys:,} | {per:,.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[50, 200, 1000])
    args = parser.parse_args()
    return guarded("cachesize", lambda procs, tmp: measure(procs, tmp, args.entries, args.tokens))


if __name__ == "__main__":
    sys.exit(main())
