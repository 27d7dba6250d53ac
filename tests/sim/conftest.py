"""Fixtures for the simulator's tests: real servers on 127.0.0.1, real clients.

`start_sim(**config)` starts a `SimServer` on a free port (closed at teardown);
`http` is an aiohttp session for /metrics and /sim; `openai_client(sim)` gives
an `AsyncOpenAI` pointed at it; `scrape(sim)` parses /metrics; `poll(cond)`
waits for a condition instead of sleeping.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from sim.config import SimConfig
from sim.server import SimServer

StartSim = Callable[..., Awaitable[SimServer]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# A timed engine fast enough for tests: ~2 ms steps.
FAST = {"decode_base_ms": 1.0, "decode_per_seq_ms": 0.1, "prefill_tokens_per_s": 1e6}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by (name, labels) and metric types by family; fails on any malformed line."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = _SAMPLE.match(line)
        assert match, f"malformed exposition line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(_LABEL.findall(labels or ""))
        samples[(name, pairs)] = float(value)
    return samples, types


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    servers: list[SimServer] = []

    async def start(**overrides: Any) -> SimServer:
        overrides.setdefault("served_model_names", ["sim-model"])
        for key, value in FAST.items():
            overrides.setdefault(key, value)
        server = SimServer(SimConfig(**overrides))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def sim(start_sim: StartSim) -> SimServer:
    """A default fast simulator serving `sim-model`."""
    return await start_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def openai_client() -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    clients: list[openai.AsyncOpenAI] = []

    def make(server: SimServer, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-sim", **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def scrape(http: aiohttp.ClientSession) -> Callable[[SimServer], Awaitable[Samples]]:
    async def get(server: SimServer) -> Samples:
        async with http.get(f"{server.url}/metrics") as resp:
            assert resp.status == 200
            samples, _ = parse_prometheus(await resp.text())
            return samples

    return get


@pytest.fixture
def stats(http: aiohttp.ClientSession) -> Callable[[SimServer], Awaitable[dict[str, Any]]]:
    async def get(server: SimServer) -> dict[str, Any]:
        async with http.get(f"{server.url}/sim/stats") as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return body

    return get


async def poll(
    condition: Callable[[], Awaitable[bool]], within: float = 5.0, interval: float = 0.005
) -> None:
    """Wait until `condition()` is true; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(interval)


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[None]]:
    return poll


def labels(model: str = "sim-model", **extra: str) -> frozenset[tuple[str, str]]:
    """The label set of a vLLM engine sample, plus `extra` labels."""
    return frozenset({("engine", "0"), ("model_name", model), *extra.items()})


@pytest.fixture
def engine_labels() -> Callable[..., frozenset[tuple[str, str]]]:
    return labels
