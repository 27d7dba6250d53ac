"""The system under test: the simulator and tollway gateways, started pinned and checked.

The upstream is ``tollway sim --zero-delay`` unless a benchmark asks for model
time: vLLM's OpenAI API with no model time, so what is left is HTTP and Python
work. A gateway gets a YAML config
built by ``gateway_config`` (one tier, one replica: the simulator) plus
whatever sections a benchmark adds, and starts with ``--log-level warning``.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.lib import HOST, REPO, BenchError
from bench.lib.net import free_port, http, wait_ready
from bench.lib.procs import Proc, Procs, check_pinned, pinned

MODEL = "bench-model"


@dataclass(frozen=True)
class Server:
    proc: Proc
    port: int

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def chat_url(self) -> str:
        return f"{self.base}/v1/chat/completions"


def tollway_bin() -> str:
    beside = Path(sys.executable).parent / "tollway"
    if beside.exists():
        return str(beside)
    venv = REPO / ".venv" / "bin" / "tollway"
    if venv.exists():
        return str(venv)
    raise BenchError("no tollway executable: run scripts/bootstrap.sh, then use .venv/bin/python")


def start_sim(
    procs: Procs, tmp: Path, cpu: int, engine: Sequence[str] = ("--zero-delay",)
) -> Server:
    """The simulator on ``cpu``; returns once it is started (not yet ready).

    ``engine``: its engine flags; zero-delay unless a benchmark needs model time.
    """
    port = free_port()
    proc = procs.start(
        "simulator",
        pinned(cpu, [
            tollway_bin(), "sim", "--host", HOST, "--port", str(port), "--model", MODEL,
            *engine, "--shutdown-timeout", "1",
        ]),
        tmp / "sim.log",
    )  # fmt: skip
    return Server(proc, port)


def gateway_config(
    sim: Server, keys: list[dict[str, Any]], *, max_num_seqs: int = 256, **sections: Any
) -> dict[str, Any]:
    """One tier serving ``MODEL`` from the simulator; ``sections`` add or replace top-level ones."""
    config: dict[str, Any] = {
        "listen": {"host": HOST, "port": 8080},  # the port is overridden by --port
        "auth": {"keys": keys},
        # Loopback only: the benchmarks read /metrics and the detailed /ready without a token.
        "ops": {"metrics_public": True},
        "tiers": [
            {
                "name": "bench",
                "models": [MODEL],
                "replicas": [
                    {
                        "url": f"http://{HOST}:{sim.port}",
                        "max_num_seqs": max_num_seqs,
                        "gpu_hourly_usd": 1.0,
                    }
                ],
            }
        ],
    }
    config.update(sections)
    return config


def start_gateway(
    procs: Procs,
    tmp: Path,
    cpu: int,
    config: dict[str, Any],
    *,
    name: str = "gateway",
    env: Mapping[str, str] | None = None,
) -> Server:
    """``tollway serve`` on ``cpu`` with ``config``; returns once started (not yet ready)."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    proc = procs.start(
        name,
        pinned(cpu, [
            tollway_bin(), "serve", "--config", str(path), "--host", HOST, "--port", str(port),
            "--log-level", "warning", "--drain-timeout", "1",
        ]),
        tmp / f"{name}.log",
        env=env,
    )  # fmt: skip
    return Server(proc, port)


def wait_sim(sim: Server, cpu: int) -> None:
    wait_ready(sim.proc, f"{sim.base}/health")
    check_pinned(sim.proc, cpu)


def wait_gateway(gateway: Server, cpu: int) -> None:
    """Until it answers and sees its replica healthy; and it must be pinned."""
    wait_ready(gateway.proc, f"{gateway.base}/health")
    wait_ready(gateway.proc, f"{gateway.base}/ready")  # the replica is healthy
    check_pinned(gateway.proc, cpu)


def sanity_check(target: str, url: str, key: str, *, gateway: bool) -> dict[str, str]:
    """One plain and one streamed request, before any timing; the plain one's headers."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"sanity {secrets.token_hex(4)}"}],
        "max_tokens": 4,
    }
    status, headers, data = http("POST", url, body, key=key)
    if status != 200 or not json.loads(data).get("choices"):
        raise BenchError(f"{target}: POST {url} answered {status}: {data[:500]!r}")
    if gateway and "x-tollway-tier" not in headers:
        raise BenchError(f"{target} answered without x-tollway-tier; is it the gateway? {url}")
    status, _, data = http("POST", url, {**body, "stream": True}, key=key)
    if status != 200 or b"data: [DONE]" not in data:
        raise BenchError(f"{target}: streamed POST {url} answered {status}: {data[:500]!r}")
    return headers
