"""Shared fixtures: a real stack of simulator replicas behind a real gateway process.

Session stack: tier ``small`` = one simulator (``sim-small``, 4 slots), tier
``large`` = two simulator replicas (``sim-large``), so retries have another
replica to go to. Every test that uses ``stack`` starts with the simulators'
faults cleared and counters zeroed.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.metrics import METRICS_TOKEN, OPS_HEADERS
from tests.support.postgres_server import PostgresServer, run_postgres
from tests.support.procs import BIN, Proc, start_gateway, start_sim
from tests.support.redis_server import RedisServer, run_redis

KEY = "sk-test-acme-0001"
OTHER_KEY = "sk-test-globex-0002"
LEDGER_KEY = "sk-test-initech-0003"  # used by one test only: its usage sums see no one else
# A prompt the complexity router scores well above the cut points tests use (code,
# math, reasoning and a multi-part instruction): it goes to the large tier.
HARD = """Debug this and prove the complexity is O(n log n):
```python
def merge(a, b):
    out = []
    while a and b:
        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))
    return out + a + b
```
Step by step: 1) find the bug, 2) fix it, 3) analyse the runtime with $\\sum_{i} n/2^i$."""
FAST_SIM = [
    "--decode-base-ms", "2", "--decode-per-seq-ms", "0.1",
    "--output-tokens-min", "8", "--output-tokens-max", "24",
]  # fmt: skip


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def sim_stats(sim: Proc) -> dict[str, Any]:
    stats: dict[str, Any] = http_json("GET", sim.url + "/sim/stats")
    return stats


def set_faults(sim: Proc, **faults: Any) -> None:
    http_json("POST", sim.url + "/sim/faults", faults)


def reset_sim(sim: Proc) -> None:
    http_json("DELETE", sim.url + "/sim/faults")
    http_json("POST", sim.url + "/sim/reset")


def gateway_config(
    small: list[str], large: list[str], redis_url: str = "redis://127.0.0.1:1/0", **overrides: Any
) -> dict[str, Any]:
    """A two-tier config; without a real ``redis_url`` the ledger fails open (port 1 is closed)."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "redis": {"url": redis_url},
        "auth": {
            "keys": [
                {"key": KEY, "tenant": "acme"},
                {"key": OTHER_KEY, "tenant": "globex", "admin": True},
                {"key": LEDGER_KEY, "tenant": "initech"},
            ]
        },
        "tiers": [
            {
                "name": "small",
                "models": ["sim-small"],
                "replicas": [{"url": u, "max_num_seqs": 4, "gpu_hourly_usd": 1.0} for u in small],
            },
            {
                "name": "large",
                "models": ["sim-large"],
                "replicas": [{"url": u, "max_num_seqs": 8, "gpu_hourly_usd": 4.0} for u in large],
            },
        ],
        "routing": {"aliases": ["auto"], "default_tier": "small"},
        "upstream": {"first_byte_timeout_s": 1.5, "total_timeout_s": 20, "max_attempts": 3},
        "health": {
            "interval_s": 0.2,
            "timeout_s": 0.5,
            "unhealthy_after": 2,
            "eject_after": 3,
            "ejection_s": 0.3,
            "max_ejection_s": 1.0,
        },
        "limits": {"max_body_bytes": 64 * 1024},
        "ops": {"metrics_token": METRICS_TOKEN},  # /metrics and the detailed /ready
    }
    config.update(overrides)
    return config


@dataclass
class Stack:
    gateway: Proc
    small: Proc
    large: list[Proc]
    log_dir: Path
    redis: RedisServer
    postgres: PostgresServer
    clients: list[openai.OpenAI] = field(default_factory=list)  # closed after each test

    @property
    def sims(self) -> list[Proc]:
        return [self.small, *self.large]

    @property
    def base_url(self) -> str:
        return self.gateway.url + "/v1"

    def client(self, key: str = KEY, **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, **kwargs)
        self.clients.append(client)
        return client

    def async_client(self, key: str = KEY, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, **kwargs)


SdkFactory = Callable[..., openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[SdkFactory]:
    """``sdk(gateway, key=KEY)``: an openai client for a gateway the test started; closed after."""
    made: list[openai.OpenAI] = []

    def make(gateway: Proc, key: str = KEY, **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts for itself (append them): stopped after it, newest first."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="session")
def stack_redis() -> Iterator[RedisServer]:
    """The stack's own Redis (the cache tests FLUSHALL theirs)."""
    with run_redis() as server:
        yield server


def migrate_database(url: str) -> None:
    """``tollway db migrate``: the database at ``url`` gets the latest schema."""
    subprocess.run(
        [str(BIN / "tollway"), "db", "migrate", "--database-url", url],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The suite's PostgreSQL, migrated. Shared: never reset it, nor stop it for long (the
    stack's gateway writes its ledger there); a test that does either starts its own."""
    with run_postgres() as server:
        migrate_database(server.url)
        yield server


def with_ledger(config: dict[str, Any], postgres: PostgresServer, spool: Path) -> dict[str, Any]:
    """``config`` with its ledger in ``postgres`` and its spool in ``spool`` (one a gateway)."""
    return {**config, "database": {"url": postgres.url}, "ledger": {"spool_dir": str(spool)}}


@pytest.fixture(scope="session")
def _session_stack(
    log_dir: Path, stack_redis: RedisServer, postgres: PostgresServer
) -> Iterator[Stack]:
    procs: list[Proc] = []
    try:
        small = start_sim(log_dir, ["sim-small"], "--max-num-seqs", "4", *FAST_SIM)
        procs.append(small)
        large = [start_sim(log_dir, ["sim-large"], *FAST_SIM) for _ in range(2)]
        procs += large
        config = gateway_config([small.url], [s.url for s in large], stack_redis.url)
        config = with_ledger(config, postgres, log_dir / "stack-spool")
        gateway = start_gateway(log_dir, config)
        procs.append(gateway)
        yield Stack(gateway, small, large, log_dir, stack_redis, postgres)
    finally:
        for proc in reversed(procs):
            proc.stop()


def all_replicas_healthy(gateway: Proc) -> bool:
    ready = detailed_ready(gateway) if _ready_ok(gateway) else None
    return ready is not None and all(
        r["available"] for tier in ready["tiers"].values() for r in tier["replicas"]
    )


def detailed_ready(gateway: Proc) -> Any:
    """The gateway's detailed ``/ready`` body (it takes the metrics token)."""
    request = urllib.request.Request(gateway.url + "/ready", headers=OPS_HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503: not ready, the body says why
        return json.loads(exc.read())


def _ready_ok(gateway: Proc) -> bool:
    try:
        with urllib.request.urlopen(gateway.url + "/ready", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def stack(_session_stack: Stack) -> Iterator[Stack]:
    """The session stack with faults cleared, counters zeroed and every replica healthy."""
    for sim in _session_stack.sims:
        reset_sim(sim)
    deadline = time.monotonic() + 10
    while not all_replicas_healthy(_session_stack.gateway):
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not see every replica healthy again")
        time.sleep(0.05)
    yield _session_stack
    for client in _session_stack.clients:
        client.close()
    _session_stack.clients.clear()
