"""Redis memory per cached response, for the sizing note in deploy/README.md.

Starts Redis, the simulator and one gateway, fills the response cache with
``--entries`` distinct ``temperature: 0`` answers of ``--tokens`` tokens each
(every request a miss, so each stores one entry), then reads Redis's
``used_memory`` and key count and prints bytes per entry. Both figures grow
with answer length; run it with the answer sizes you expect.

    .venv/bin/python bench/cachesize/run.py [--entries 2000] [--tokens 50 200 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for bench.lib

from bench.lib import HOST
from bench.lib.procs import Procs, guarded
from bench.lib.redis_server import start_redis
from bench.lib.stack import MODEL, gateway_config, start_gateway, start_sim, wait_gateway, wait_sim

KEY = "sk-bench-cachesize-0001"


def redis_info(port: int) -> dict[str, str]:
    """``INFO memory`` and ``INFO keyspace`` as a dict, over a raw socket."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"INFO\r\n")
        data = b""
        while True:
            data += sock.recv(65536)
            header, _, rest = data.partition(b"\r\n")
            if header.startswith(b"$") and len(rest) >= int(header[1:]):
                break
    lines = rest.decode().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))


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
    redis = start_redis(procs, tmp, 1)
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
            sim, [{"key": KEY, "tenant": "bench"}], redis={"url": redis.url},
            cache={"local_ttl_s": 0}, metering={"enabled": False},
        )  # fmt: skip
        gateway = start_gateway(procs, tmp, 0, config, name=f"gateway-{tokens}")
        wait_gateway(gateway, 0)
        before = redis_info(redis.port)
        stored = asyncio.run(fill(gateway.chat_url, entries, tokens, f"t{tokens}"))
        after = redis_info(redis.port)
        grown = int(after["used_memory"]) - int(before["used_memory"])
        rows.append((tokens, stored, grown, grown / max(stored, 1)))
        procs.stop(gateway.proc)
        procs.stop(sim.proc)
    print("| answer tokens | entries stored | Redis used_memory growth | bytes per entry |")
    print("|---:|---:|---:|---:|")
    for tokens, stored, grown, per in rows:
        print(f"| {tokens} | {stored:,} | {grown / 1e6:.2f} MB | {per:,.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[50, 200, 1000])
    args = parser.parse_args()
    return guarded("cachesize", lambda procs, tmp: measure(procs, tmp, args.entries, args.tokens))


if __name__ == "__main__":
    sys.exit(main())
