"""Watching a replica's vLLM /metrics (and the gateway's queue) while a test drives load."""

from __future__ import annotations

import json
import threading
import urllib.request

from gateway.scrape import parse_vllm_load
from tests.support.metrics import OPS_HEADERS


class VllmWatcher:
    """Polls a replica's /metrics in a thread: the most running and waiting it ever saw."""

    def __init__(self, url: str, every_s: float = 0.01, gateway: str | None = None):
        self.url = url + "/metrics"
        self.every_s = every_s
        self.gateway = gateway  # also poll its /ready for the deepest admission queue
        self.max_running = 0
        self.max_waiting = 0
        self.max_queued = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with urllib.request.urlopen(self.url, timeout=5) as response:
                load = parse_vllm_load(response.read().decode())
            if load is not None:  # counted only when read: tests check ``samples``
                self.max_running = max(self.max_running, load.running)
                self.max_waiting = max(self.max_waiting, load.waiting)
                self.samples += 1
            if self.gateway is not None:
                ready = urllib.request.Request(self.gateway + "/ready", headers=OPS_HEADERS)
                with urllib.request.urlopen(ready, timeout=5) as response:
                    tiers = json.loads(response.read())["tiers"]
                queued = sum(tier["queue_depth"] for tier in tiers.values())
                self.max_queued = max(self.max_queued, queued)
            self._stop.wait(self.every_s)

    def __enter__(self) -> VllmWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
