"""A null OTLP/HTTP trace collector: answers 200 to ``POST /v1/traces`` and counts the spans.

It decodes every batch (``ExportTraceServiceRequest``), so a count is of spans
really received, not of requests. ``GET /stats`` returns
``{"exports": n, "spans": m, "bytes": b}``. It runs as its own process, pinned
like any other (``start_sink``), so decoding costs the load core, never the
gateway's::

    python -m bench.lib.otlp_sink --port 4318
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.lib import HOST, BenchError
from bench.lib.net import free_port, http, wait_ready
from bench.lib.procs import Proc, Procs, check_pinned, pinned

TRACES = "/v1/traces"


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exports = 0
        self.spans = 0
        self.bytes = 0

    def add(self, spans: int, size: int) -> None:
        with self.lock:
            self.exports += 1
            self.spans += spans
            self.bytes += size

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"exports": self.exports, "spans": self.spans, "bytes": self.bytes}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.counts = _Counts()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real collector does
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != TRACES:
            self._reply(404, b"", "text/plain")
            return
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        try:
            batch = ExportTraceServiceRequest.FromString(body)
        except Exception:  # noqa: BLE001 - any undecodable body is the client's fault
            self._reply(400, b"not an ExportTraceServiceRequest", "text/plain")
            return
        spans = sum(len(scope.spans) for rs in batch.resource_spans for scope in rs.scope_spans)
        self.server.counts.add(spans, len(body))
        reply = ExportTraceServiceResponse().SerializeToString()
        self._reply(200, reply, "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path != "/stats":
            self._reply(404, b"", "text/plain")
            return
        self._reply(200, json.dumps(self.server.counts.as_dict()).encode(), "application/json")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per export would only fill the log


@dataclass(frozen=True)
class Sink:
    proc: Proc
    port: int

    @property
    def base(self) -> str:
        """What ``OTEL_EXPORTER_OTLP_ENDPOINT`` should say; the SDK appends ``/v1/traces``."""
        return f"http://{HOST}:{self.port}"

    def stats(self) -> dict[str, int]:
        status, _, data = http("GET", f"{self.base}/stats")
        if status != 200:
            raise BenchError(f"the OTLP sink's /stats answered {status}")
        counts: dict[str, int] = json.loads(data)
        return counts


def start_sink(procs: Procs, tmp: Path, cpu: int) -> Sink:
    """The sink as a process on ``cpu``; returns once it answers."""
    port = free_port()
    proc = procs.start(
        "otlp-sink",
        pinned(cpu, [sys.executable, "-m", "bench.lib.otlp_sink", "--port", str(port)]),
        tmp / "otlp-sink.log",
    )
    sink = Sink(proc, port)
    wait_ready(proc, f"{sink.base}/stats", timeout=20.0)
    check_pinned(proc, cpu)
    return sink


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with _Server((args.host, args.port)) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
