"""SIGTERM: the gateway stops taking connections but lets requests in flight finish."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from tests.conftest import KEY, gateway_config
from tests.support.procs import Proc, start_gateway, start_sim

# ~1.5 s per answer: 30 tokens at 50 ms a step
SLOW = ["--decode-base-ms", "50", "--output-tokens-min", "30", "--output-tokens-max", "30"]


def test_sigterm_lets_the_request_in_flight_finish(procs: list[Proc], log_dir: Path) -> None:
    small = start_sim(log_dir, ["sim-small"], *SLOW)
    procs.append(small)
    large = start_sim(log_dir, ["sim-large"], "--zero-delay")
    procs.append(large)
    gateway = start_gateway(log_dir, gateway_config([small.url], [large.url]))
    procs.append(gateway)
    result: dict[str, Any] = {}

    def call() -> None:
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "sim-small", "max_tokens": 30,
                  "messages": [{"role": "user", "content": "take your time"}]},
            headers={"authorization": f"Bearer {KEY}"},
            timeout=30,
        )  # fmt: skip
        result["status"] = response.status_code
        result["body"] = response.json()

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the request is at the replica now
    started = time.monotonic()
    gateway.popen.send_signal(signal.SIGTERM)
    caller.join(30)
    assert result["status"] == 200
    assert result["body"]["usage"]["completion_tokens"] == 30
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why
    assert gateway.popen.wait(30) in (0, -signal.SIGTERM)
    assert time.monotonic() - started >= 0.5  # it waited for the answer (~1 s left)
