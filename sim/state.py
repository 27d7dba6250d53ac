"""Per-app state: the engine and everything the handlers share, plus /sim/stats counters.

One `SimState` is built by `create_app` and stored under `SIM_STATE`; nothing
lives at module level. `RequestStats` counts HTTP requests (not engine
sequences) so tests can count upstream calls exactly: every completion request
that reaches a handler is `received`, and ends in exactly one outcome:

    received = finished + rejected + failed + aborted + dropped + in_flight

- finished: answered in full (a stream through `[DONE]`);
- rejected: a 4xx for a bad request or an unknown model;
- failed: an injected error (`error_rate`);
- aborted: the client went away first (including after a hang);
- dropped: the simulator cut the connection (`die_mid_stream_rate`, or a hang
  ended by shutdown).

`/sim/reset` zeroes the counters; do it while no request is in flight, or the
identity above is off by the requests that were.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web

from sim.config import SimConfig
from sim.engine import Engine
from sim.faults import FaultInjector
from sim.metrics import EngineMetrics
from sim.protocol import Kind
from sim.textgen import TextGenerator

ENDPOINTS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
RECENT_REQUESTS = 256


@dataclass
class RequestStats:
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS.values(), 0))
    finished: int = 0
    rejected: int = 0
    failed: int = 0
    aborted: int = 0
    dropped: int = 0
    hung: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def count(self, outcome: str) -> None:
        """Add one to the counter named `outcome` (see the module docstring)."""
        setattr(self, outcome, getattr(self, outcome) + 1)

    def reset(self) -> None:
        # in_flight is a gauge of live requests, not a counter: it survives a reset.
        fresh = RequestStats()
        for f in fields(self):
            if f.name != "in_flight":
                setattr(self, f.name, getattr(fresh, f.name))


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """What reached a completion endpoint, for tests that check what a gateway sent.

    `body` is the decoded JSON, or the raw text when it was not JSON.
    """

    endpoint: str
    time: float
    headers: Mapping[str, str]
    body: Any

    def to_json(self) -> dict[str, Any]:
        # Names lower-cased (they are case-insensitive) and plain str: multidict's
        # `istr` keys are refused by JSON encoders. Done here, not per request.
        headers = {name.lower(): value for name, value in self.headers.items()}
        return {"endpoint": self.endpoint, "time": self.time, "headers": headers, "body": self.body}


class SimState:
    """Everything the handlers of one simulator app share; built once by `create_app`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.served_models = frozenset(config.served_model_names)
        self.metrics = EngineMetrics()
        self.engine = Engine(config, self.metrics)
        self.faults = FaultInjector(config.faults, config.seed)
        self.textgen = TextGenerator(
            config.seed, config.output_tokens_min, config.output_tokens_max
        )
        self.stats = RequestStats()
        self.recent: deque[RecordedRequest] = deque(maxlen=RECENT_REQUESTS)
        self.started = int(time.time())
        self.stopping = asyncio.Event()
        """Set at shutdown: hung requests stop waiting and drop their connection."""
        # Ids like vLLM's (32 hex digits), unique per process without a uuid per request.
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._id_prefix}{next(self._ids):016x}"

    def record(self, endpoint: str, headers: Mapping[str, str], body: Any) -> None:
        # The request's own read-only headers mapping: no copy on the hot path.
        self.recent.append(RecordedRequest(endpoint, time.time(), headers, body))

    def reset(self) -> None:
        """Zero every counter: /sim/stats, the Prometheus counters and histograms."""
        self.stats.reset()
        self.metrics.reset()
        self.engine.reset_peaks()
        self.recent.clear()

    def stats_json(self) -> dict[str, Any]:
        s = self.stats
        engine = self.engine
        return {
            "requests_received": dict(s.received),
            "requests_received_total": sum(s.received.values()),
            "requests_finished": s.finished,
            "requests_rejected": s.rejected,
            "requests_failed": s.failed,
            "requests_aborted": s.aborted,
            "requests_dropped": s.dropped,
            "requests_hung": s.hung,
            "in_flight": s.in_flight,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "max_running_seen": engine.max_running_seen,
            "max_waiting_seen": engine.max_waiting_seen,
            "kv_cache_usage": engine.kv.usage,
            "preemptions": self.metrics.preemptions,
        }


SIM_STATE: web.AppKey[SimState] = web.AppKey("sim_state", SimState)
