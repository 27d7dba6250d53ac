"""Every way a request can end settles it exactly once: the branch matrix, in process.

The gateway runs in the test's event loop (``Services.build``, the ASGI app
driven by ``tests.support.asgi``) in front of two scripted vLLM replicas
(``tests.support.fake_vllm``: tier ``small``, tier ``large``) and a real
Redis, so the cache, coalescing and idempotency are the real thing. Spans go
to the stock SDK's in-memory exporter, every request sampled.

For each request that was routed, whatever happened to it after, the test
asserts exactly one report (its status, cache status and ``error.type``),
exactly one ended request span (status ERROR with that ``error.type``, or
unset), and exactly one ledger row, both as handed to the ledger and as
stored in PostgreSQL. A request refused before it was routed did no
work (``test_refused_before_routing``: a bad key, a body that does not parse,
is cut short by a disconnect, is too slow or too large; an unknown model, a
tier the key may not pick): it has no report and no ledger row and only
counts in ``tollway_requests_total``. Its span, if routing had started it (the
last two), ends failed.

After every test (``Gateway.finish``): every request sent was checked, every
span that started has ended, ``tollway_requests_total`` counts exactly the
checked requests by status, no slot or queue place is left taken, and the
gateway logged no error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from aiohttp import web
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import StatusCode

from gateway.app import create_api
from gateway.config import parse_settings
from gateway.request_id import RequestIdMiddleware
from gateway.services import Services
from metering.report import RequestReport
from metering.telemetry import Telemetry
from metering.usage import TokenUsage
from tests.conftest import KEY, gateway_config, with_ledger
from tests.support.asgi import Hangup, Reply, call
from tests.support.fake_vllm import (
    PROMPT_TOKENS,
    Call,
    FakeVllm,
    answer,
    hang,
    in_turn,
    stall_body,
    stream,
    vllm_error,
)
from tests.support.metrics import parse, value
from tests.support.postgres_server import PostgresServer
from tests.support.redis_server import RedisServer, run_redis

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
CLIENT_SPAN = "00f067aa0ba902b7"  # the client's span: every request span's parent


def chat(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "sim-small", "messages": [{"role": "user", "content": content}], **fields}


def body_for(path: str, **fields: Any) -> dict[str, Any]:
    if path == CHAT:
        return chat(**fields)
    return {"model": "sim-small", "prompt": "hi", **fields}


# -- the harness -----------------------------------------------------------------


class SpanWatch(SpanProcessor):
    """Spans started and not yet ended, by id: none may be left once requests are done."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.open[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.open.pop(span.context.span_id, None)


@dataclass
class Sent:
    rid: str
    reply: Reply


@dataclass
class Settled:
    report: RequestReport
    span: ReadableSpan


class Gateway:
    """One gateway in the test's loop, with everything a settlement produces captured."""

    def __init__(self, services: Services, redis_url: str):
        self.services = services
        self.app = RequestIdMiddleware(create_api(services))
        self.redis_url = redis_url
        self.exporter = InMemorySpanExporter()
        self.watch = SpanWatch()
        self.provider = TracerProvider(sampler=ALWAYS_ON)
        self.provider.add_span_processor(self.watch)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        services.pipeline.telemetry = Telemetry(self.provider)
        self.reports: list[RequestReport] = []
        services.recorder.consumers.append(self.reports.extend)
        self.ledger_rows: list[RequestReport] = []  # what the ledger was handed
        ledger = services.ledger
        assert ledger is not None
        consumers = services.recorder.consumers

        def to_ledger(batch: Sequence[RequestReport]) -> None:
            self.ledger_rows.extend(batch)
            ledger.record_many(batch)

        consumers[consumers.index(ledger.record_many)] = to_ledger
        self.traces: dict[str, int] = {}  # request id -> the trace its span joined
        self.checked: dict[str, int] = {}  # request id -> its status, once checked

    async def post(
        self,
        body: dict[str, Any] | bytes | list[bytes],
        *,
        path: str = CHAT,
        key: str = KEY,
        headers: dict[str, str] | None = None,
        hangup: Hangup | None = None,
        body_complete: bool = True,
    ) -> Sent:
        rid = f"settle-{uuid.uuid4().hex[:16]}"
        trace_id = uuid.uuid4().int >> 1
        self.traces[rid] = trace_id
        sent_headers = {
            "authorization": f"Bearer {key}",
            "content-type": "application/json",
            "x-request-id": rid,
            "traceparent": f"00-{trace_id:032x}-{CLIENT_SPAN}-01",
            **(headers or {}),
        }
        payload = orjson.dumps(body) if isinstance(body, dict) else body
        reply = await call(
            self.app,
            "POST",
            path,
            headers=sent_headers,
            body=payload,
            hangup=hangup,
            body_complete=body_complete,
        )
        return Sent(rid, reply)

    def spans_of(self, rid: str) -> list[ReadableSpan]:
        """The request's own spans (children of the client's span), ended."""
        trace_id = self.traces[rid]
        return [
            span
            for span in self.exporter.get_finished_spans()
            if span.context is not None
            and span.context.trace_id == trace_id
            and span.parent is not None
            and span.parent.span_id == int(CLIENT_SPAN, 16)
        ]

    async def stored_rows(self, rid: str) -> list[dict[str, Any]]:
        """The ledger's rows for ``rid`` in PostgreSQL, once its writer has caught up."""
        ledger, database = self.services.ledger, self.services.database
        assert ledger is not None
        assert database is not None
        assert await ledger.flush()
        rows = await database.fetch("SELECT * FROM usage_requests WHERE request_id = $1", rid)
        return [dict(row) for row in rows]

    async def settled(
        self, rid: str, *, status: int, cache: str, error: str | None = None
    ) -> Settled:
        """Exactly one report, one ended span and one ledger row, all saying the same."""
        self.services.recorder.drain()
        reports = [r for r in self.reports if r.request_id == rid]
        assert len(reports) == 1, f"{len(reports)} reports for {rid}: {reports}"
        report = reports[0]
        assert (report.status, report.cache, report.error_type) == (status, cache, error)
        assert [r for r in self.ledger_rows if r.request_id == rid] == [report]
        rows = await self.stored_rows(rid)
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["status"], row["cache"], row["error_type"]) == (status, cache, error)
        assert row["cost_loaded_nanos"] == report.cost.loaded_nanos
        spans = self.spans_of(rid)
        assert len(spans) == 1, f"{len(spans)} request spans for {rid}"
        span = spans[0]
        attributes = dict(span.attributes or {})
        assert attributes["tollway.request_id"] == rid
        assert attributes["tollway.cache"] == cache
        # The span's error.type: the gateway's error, else a failing status (GenAI conventions).
        span_error = error if error is not None else str(status) if status >= 400 else None
        assert attributes.get("error.type") == span_error
        failed = StatusCode.ERROR if span_error is not None else StatusCode.UNSET
        assert span.status.status_code is failed
        self.checked[rid] = status
        return Settled(report, span)

    async def refused(self, rid: str, *, status: int, error: str) -> ReadableSpan | None:
        """No report, no ledger row; the request's span, if one started, ended failed."""
        self.services.recorder.drain()
        assert [r for r in self.reports if r.request_id == rid] == []
        assert [r for r in self.ledger_rows if r.request_id == rid] == []
        assert await self.stored_rows(rid) == []
        spans = self.spans_of(rid)
        assert len(spans) <= 1
        for span in spans:
            assert span.status.status_code is StatusCode.ERROR
            assert dict(span.attributes or {})["error.type"] == error
        self.checked[rid] = status
        return spans[0] if spans else None

    async def wait_for(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, "timed out waiting"
            await asyncio.sleep(0.005)

    def routed(self, rid: str) -> bool:
        """Whether ``rid`` is past routing (its ``tollway.route`` step ended)."""
        trace_id = self.traces[rid]
        return any(
            span.name == "tollway.route"
            and span.context is not None
            and span.context.trace_id == trace_id
            for span in self.exporter.get_finished_spans()
        )

    async def wait_for_follower(self, timeout_s: float = 5.0) -> None:
        """Until a coalescing follower waits on its leader: it polls the flight's lock
        with EXISTS, which nothing else sends (Redis's stats are reset at each start)."""
        client = redis.asyncio.Redis.from_url(self.redis_url)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    stats = await client.info("commandstats")
                    if stats.get("cmdstat_exists"):
                        return
                    await asyncio.sleep(0.005)
        finally:
            await client.aclose()

    def requests_by_status(self) -> dict[str, float]:
        samples = parse(self.services.metrics.render()[0].decode())
        counted: dict[str, float] = collections.defaultdict(float)
        for (name, labels), count in samples.items():
            if name == "tollway_requests_total" and count:
                counted[dict(labels)["status"]] += count
        return dict(counted)

    def finish(self) -> None:
        """The invariants every test ends with (see the module docstring)."""
        assert set(self.checked) == set(self.traces), "a request was sent and never checked"
        assert self.watch.open == {}, f"spans never ended: {self.watch.open}"
        self.services.recorder.drain()
        expected = collections.Counter(str(status) for status in self.checked.values())
        assert self.requests_by_status() == {k: float(v) for k, v in expected.items()}
        for replica in self.services.pools.replicas():
            assert replica.in_flight == 0, f"{replica.url} still holds {replica.in_flight}"
        for pool in self.services.pools:
            assert self.services.scheduler.depth(pool.name) == 0

    async def stop(self) -> None:
        await self.services.stop()
        self.provider.shutdown()


@pytest.fixture(scope="session")
def settle_redis() -> Iterator[RedisServer]:
    with run_redis() as server:
        yield server


@dataclass
class Fakes:
    small: FakeVllm
    large: FakeVllm


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with FakeVllm() as small, FakeVllm() as large:
        yield Fakes(small, large)


Start = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start(
    fakes: Fakes,
    settle_redis: RedisServer,
    postgres: PostgresServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Start]:
    """``await start(small_tier={...}, upstream={...})``: a gateway in front of the fakes,
    its config sections updated with the keyword arguments. After the test, unless it
    failed already: ``Gateway.finish`` and no error logged."""
    failed_before = request.session.testsfailed
    caplog.set_level(logging.INFO, logger="tollway")
    started: list[Gateway] = []

    async def make(small_tier: dict[str, Any] | None = None, **sections: Any) -> Gateway:
        config = gateway_config([fakes.small.url], [fakes.large.url], settle_redis.url)
        config = with_ledger(config, postgres, tmp_path / f"spool-{len(started)}")
        config["redis"]["call_budget_ms"] = 2000  # Redis is not what these tests are about
        config["upstream"] = {
            "connect_timeout_s": 1,
            "first_byte_timeout_s": 2,
            "total_timeout_s": 5,
            "max_attempts": 3,
        }
        config["cache"] = {"coalesce_wait_s": 5}
        config["idempotency"] = {"wait_s": 5, "lease_s": 5}
        config["scheduling"] = {"deadline_ms": 5000}
        for name, section in sections.items():
            config.setdefault(name, {}).update(section)
        small = config["tiers"][0]
        small.update(small_tier or {})
        small["replicas"][0]["max_num_seqs"] = small.pop("max_num_seqs", 4)
        client = redis.asyncio.Redis.from_url(settle_redis.url)
        try:
            await client.flushall()
            await client.config_resetstat()
        finally:
            await client.aclose()
        gateway = Gateway(Services.build(parse_settings(config, "test")), settle_redis.url)
        started.append(gateway)
        await gateway.services.start()
        return gateway

    yield make
    judge = request.session.testsfailed == failed_before
    try:
        for gateway in started:
            if judge:
                gateway.finish()
    finally:
        for gateway in started:
            await gateway.stop()
    if not judge:
        return
    errors = [
        r for r in caplog.records if r.name.startswith("tollway") and r.levelno >= logging.ERROR
    ]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.fixture
async def gw(start: Start) -> Gateway:
    return await start()


# -- answered -----------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, TEXT])
async def test_answered_whole(gw: Gateway, fakes: Fakes, path: str) -> None:
    sent = await gw.post(body_for(path), path=path)
    assert sent.reply.status == 200
    assert sent.reply.json()["usage"]["completion_tokens"] == 2
    settled = await gw.settled(sent.rid, status=200, cache="bypass")
    report = settled.report
    assert report.usage == TokenUsage(PROMPT_TOKENS, 2)
    assert (report.tier, report.model, report.attempts) == ("small", "sim-small", 1)
    assert report.replica == fakes.small.url
    assert report.cost.marginal_nanos > 0
    assert sent.reply.headers["x-tollway-cost-usd"] == f"{report.cost.marginal:.9f}"
    assert dict(settled.span.attributes or {})["gen_ai.usage.output_tokens"] == 2


@pytest.mark.parametrize("path", [CHAT, TEXT])
async def test_answered_as_stream(gw: Gateway, fakes: Fakes, path: str) -> None:
    sent = await gw.post(body_for(path, stream=True), path=path)
    assert sent.reply.status == 200
    assert sent.reply.complete
    events = sent.reply.events
    assert events[-1] == "[DONE]"
    assert events[-2]["tollway"]["completion_tokens"] == 2
    (upstream,) = fakes.small.calls
    assert upstream.stream_options == {"include_usage": True, "continuous_usage_stats": True}
    settled = await gw.settled(sent.rid, status=200, cache="bypass")
    assert settled.report.usage == TokenUsage(PROMPT_TOKENS, 2)
    assert settled.report.ttft_s is not None


# -- answered without the model -------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
async def test_idempotent_replay(gw: Gateway, fakes: Fakes, streamed: bool) -> None:
    body = chat(stream=True) if streamed else chat()
    key = {"idempotency-key": f"k-{uuid.uuid4().hex}"}
    first = await gw.post(body, headers=key)
    again = await gw.post(body, headers=key)
    assert first.reply.status == again.reply.status == 200
    assert again.reply.headers["idempotent-replayed"] == "true"
    assert len(fakes.small.calls) == 1
    if streamed:
        assert again.reply.events[-1] == "[DONE]"
        assert again.reply.events[-2]["tollway"]["cache"] == "replay"
    ran = await gw.settled(first.rid, status=200, cache="bypass")
    replayed = await gw.settled(again.rid, status=200, cache="replay")
    assert replayed.report.cost.marginal_nanos == 0
    assert replayed.report.saved_nanos == ran.report.cost.marginal_nanos > 0
    assert replayed.report.attempts == 0


async def test_cache_hit_whole_and_stream(gw: Gateway, fakes: Fakes) -> None:
    body = chat(temperature=0)
    miss = await gw.post(body)
    hit = await gw.post(body)
    streamed_hit = await gw.post({**body, "stream": True})
    assert (miss.reply.headers["x-tollway-cache"], hit.reply.headers["x-tollway-cache"]) == (
        "miss",
        "hit",
    )
    assert streamed_hit.reply.events[-1] == "[DONE]"
    assert streamed_hit.reply.events[-2]["tollway"]["cache"] == "hit"
    assert len(fakes.small.calls) == 1
    ran = await gw.settled(miss.rid, status=200, cache="miss")
    for sent in (hit, streamed_hit):
        settled = await gw.settled(sent.rid, status=200, cache="hit")
        assert settled.report.usage == ran.report.usage
        assert settled.report.saved_nanos == ran.report.cost.marginal_nanos
        assert settled.report.attempts == 0


async def test_streamed_answer_is_stored_then_hit(gw: Gateway, fakes: Fakes) -> None:
    body = chat(temperature=0)
    miss = await gw.post({**body, "stream": True})
    hit = await gw.post(body)
    assert hit.reply.json()["choices"][0]["message"]["content"] == "Hello there"
    assert len(fakes.small.calls) == 1
    await gw.settled(miss.rid, status=200, cache="miss")
    await gw.settled(hit.rid, status=200, cache="hit")


async def test_coalesced_follower(gw: Gateway, fakes: Fakes) -> None:
    release = asyncio.Event()
    fakes.small.script = hang(release)
    body = chat(temperature=0)
    leader = asyncio.ensure_future(gw.post(body))
    await fakes.small.wait_for_calls(1)
    follower = asyncio.ensure_future(gw.post(body))
    await gw.wait_for_follower()
    release.set()
    led, followed = await leader, await follower
    assert followed.reply.headers["x-tollway-cache"] == "coalesced"
    assert len(fakes.small.calls) == 1
    await gw.settled(led.rid, status=200, cache="miss")
    settled = await gw.settled(followed.rid, status=200, cache="coalesced")
    assert settled.report.attempts == 0


# -- refused after the span started ------------------------------------------------------


async def test_idempotency_conflict_409(start: Start, fakes: Fakes) -> None:
    gw = await start(idempotency={"wait_s": 0.2})
    release = asyncio.Event()
    fakes.small.script = hang(release)
    key = {"idempotency-key": "k-409"}
    first = asyncio.ensure_future(gw.post(chat(), headers=key))
    await fakes.small.wait_for_calls(1)
    conflict = await gw.post(chat(), headers=key)
    assert conflict.reply.status == 409
    assert "retry-after" in conflict.reply.headers
    await gw.settled(conflict.rid, status=409, cache="bypass", error="idempotency_key_in_use")
    release.set()
    ran = await first
    await gw.settled(ran.rid, status=200, cache="bypass")
    assert len(fakes.small.calls) == 1


async def test_idempotency_key_with_another_body_422(gw: Gateway, fakes: Fakes) -> None:
    key = {"idempotency-key": "k-422"}
    first = await gw.post(chat("one"), headers=key)
    other = await gw.post(chat("another"), headers=key)
    assert other.reply.status == 422
    await gw.settled(first.rid, status=200, cache="bypass")
    await gw.settled(other.rid, status=422, cache="bypass", error="idempotency_key_reused")
    assert len(fakes.small.calls) == 1


@pytest.mark.parametrize(
    ("scheduling", "error"),
    [({"deadline_ms": 100}, "queue_deadline_exceeded"), ({"max_queue": 0}, "queue_full")],
    ids=["deadline", "queue full"],
)
async def test_shed_by_admission_429(
    start: Start, fakes: Fakes, scheduling: dict[str, Any], error: str
) -> None:
    gw = await start(small_tier={"max_num_seqs": 1}, scheduling=scheduling)
    release = asyncio.Event()
    fakes.small.script = hang(release)
    first = asyncio.ensure_future(gw.post(chat()))
    await fakes.small.wait_for_calls(1)
    shed = await gw.post(chat())
    assert shed.reply.status == 429
    assert "retry-after" in shed.reply.headers
    settled = await gw.settled(shed.rid, status=429, cache="bypass", error=error)
    assert settled.report.attempts == 0
    release.set()
    await gw.settled((await first).rid, status=200, cache="bypass")


# -- upstream failures ---------------------------------------------------------------


@pytest.mark.parametrize(("status", "attempts"), [(500, 1), (503, 3)])
async def test_upstream_error_after_retries_502(
    gw: Gateway, fakes: Fakes, status: int, attempts: int
) -> None:
    async def failing(call: Call) -> web.StreamResponse:
        return vllm_error(status, "engine dead")

    fakes.small.script = failing
    sent = await gw.post(chat())
    assert sent.reply.status == 502
    assert sent.reply.json()["error"]["code"] == "upstream_error"
    settled = await gw.settled(sent.rid, status=502, cache="bypass", error="upstream_error")
    assert settled.report.attempts == attempts == len(fakes.small.calls)


async def test_vllm_400_relayed(gw: Gateway, fakes: Fakes) -> None:
    message = "This model's maximum context length is 2048 tokens."

    async def refusing(call: Call) -> web.StreamResponse:
        return vllm_error(400, message, param="messages")

    fakes.small.script = refusing
    sent = await gw.post(chat())
    assert sent.reply.status == 400
    assert sent.reply.json()["error"]["message"] == message
    settled = await gw.settled(sent.rid, status=400, cache="bypass", error="upstream_400")
    assert settled.report.attempts == 1


@pytest.mark.parametrize(
    ("attempts", "status", "error"),
    [(1, 502, "upstream_error"), (3, 503, "no_healthy_upstream")],
)
async def test_connect_refused(
    start: Start, fakes: Fakes, attempts: int, status: int, error: str
) -> None:
    """The replica passed its health check, then went down: the connection is refused.
    With retries allowed the refused replica is ejected at once, so the retry finds the
    tier empty: 503."""
    gw = await start(upstream={"max_attempts": attempts}, health={"interval_s": 60})
    await fakes.small.close()
    sent = await gw.post(chat())
    assert sent.reply.status == status
    settled = await gw.settled(sent.rid, status=status, cache="bypass", error=error)
    samples = parse(gw.services.metrics.render()[0].decode())
    tried = value(samples, "tollway_upstream_attempts_total", tier="small")
    # A keep-alive connection left by the health check may fail first, then the refusal.
    assert settled.report.attempts == tried >= 1


@pytest.mark.parametrize("when", ["down at start", "refused mid-request"])
async def test_fallback_to_another_tier(start: Start, fakes: Fakes, when: str) -> None:
    if when == "down at start":
        await fakes.small.close()
    gw = await start(small_tier={"fallback": ["large"]}, health={"interval_s": 60})
    if when == "refused mid-request":
        await fakes.small.close()
    sent = await gw.post(chat())
    assert sent.reply.status == 200
    assert sent.reply.headers["x-tollway-fallback-from"] == "small"
    settled = await gw.settled(sent.rid, status=200, cache="bypass")
    assert (settled.report.tier, settled.report.model) == ("large", "sim-large")
    assert settled.report.replica == fakes.large.url
    assert dict(settled.span.attributes or {})["tollway.fallback.from"] == "small"
    (upstream,) = fakes.large.calls
    assert upstream.model == "sim-large"


async def test_tier_down_without_fallback_503(start: Start, fakes: Fakes) -> None:
    await fakes.small.close()
    gw = await start(health={"interval_s": 60})
    sent = await gw.post(chat())
    assert sent.reply.status == 503
    settled = await gw.settled(sent.rid, status=503, cache="bypass", error="no_healthy_upstream")
    assert settled.report.attempts == 0


async def test_upstream_timeout_504(start: Start, fakes: Fakes) -> None:
    gw = await start(upstream={"total_timeout_s": 0.3})
    fakes.small.script = hang(asyncio.Event())
    sent = await gw.post(chat())
    assert sent.reply.status == 504
    settled = await gw.settled(sent.rid, status=504, cache="bypass", error="upstream_timeout")
    assert settled.report.attempts == 1  # a whole answer's time is spent: not retried
    (held,) = fakes.small.calls
    await asyncio.wait_for(held.closed.wait(), 2)


async def test_stream_stalls_past_the_read_timeout(start: Start, fakes: Fakes) -> None:
    gw = await start(upstream={"first_byte_timeout_s": 0.3})

    async def stalling(call: Call) -> web.StreamResponse:
        return await stream(call, ["a", "b", "c"], stall_after=1)

    fakes.small.script = stalling
    sent = await gw.post(chat(stream=True))
    assert sent.reply.status == 200
    assert sent.reply.events[-2]["error"]["code"] == "upstream_stream_error"
    assert sent.reply.events[-1] == "[DONE]"
    settled = await gw.settled(sent.rid, status=504, cache="bypass", error="upstream_stream_error")
    assert settled.report.usage == TokenUsage(PROMPT_TOKENS, 1)
    (held,) = fakes.small.calls
    await asyncio.wait_for(held.closed.wait(), 2)


async def test_stream_cut_by_the_upstream(gw: Gateway, fakes: Fakes) -> None:
    async def cut(call: Call) -> web.StreamResponse:
        return await stream(call, ["a", "b", "c"], cut_after=1)

    fakes.small.script = cut
    sent = await gw.post(chat(stream=True))
    assert sent.reply.status == 200
    assert sent.reply.complete
    assert sent.reply.events[-2]["error"]["code"] == "upstream_stream_error"
    assert sent.reply.events[-1] == "[DONE]"
    settled = await gw.settled(sent.rid, status=502, cache="bypass", error="upstream_stream_error")
    assert settled.report.usage == TokenUsage(PROMPT_TOKENS, 1)  # billed for what was made


# -- the client leaves ---------------------------------------------------------------------


async def test_client_gone_waiting_for_a_slot(start: Start, fakes: Fakes) -> None:
    gw = await start(small_tier={"max_num_seqs": 1})
    release, gone = asyncio.Event(), asyncio.Event()
    fakes.small.script = hang(release)
    first = asyncio.ensure_future(gw.post(chat()))
    await fakes.small.wait_for_calls(1)
    waiting = asyncio.ensure_future(gw.post(chat(), hangup=Hangup(when=gone)))
    await gw.wait_for(lambda: gw.services.scheduler.depth("small") == 1)
    gone.set()
    left = await waiting
    assert left.reply.status is None
    settled = await gw.settled(left.rid, status=499, cache="bypass", error="client_disconnected")
    assert settled.report.attempts == 0
    release.set()
    await gw.settled((await first).rid, status=200, cache="bypass")
    assert len(fakes.small.calls) == 1


@pytest.mark.parametrize("upstream", ["before its head", "mid-body"])
async def test_client_gone_during_the_upstream_call(
    gw: Gateway, fakes: Fakes, upstream: str
) -> None:
    never, gone = asyncio.Event(), asyncio.Event()
    fakes.small.script = hang(never) if upstream == "before its head" else stall_body(never)
    sent = asyncio.ensure_future(gw.post(chat(), hangup=Hangup(when=gone)))
    (held,) = await fakes.small.wait_for_calls(1)
    gone.set()
    left = await sent
    assert left.reply.status is None
    settled = await gw.settled(left.rid, status=499, cache="bypass", error="client_disconnected")
    assert settled.report.attempts == 1
    await asyncio.wait_for(held.closed.wait(), 2)  # vLLM saw the connection go: it aborts


async def test_client_gone_after_the_upstream_answered(gw: Gateway, fakes: Fakes) -> None:
    """The answer was made and billed; the client left as its head was sent (the server
    drops the rest, as uvicorn does): the gateway cannot tell, and settles it as answered."""
    sent = await gw.post(chat(), hangup=Hangup(at_response_start=True))
    assert sent.reply.status == 200
    assert sent.reply.hung_up
    assert sent.reply.dropped == 1
    settled = await gw.settled(sent.rid, status=200, cache="bypass")
    assert settled.report.usage == TokenUsage(PROMPT_TOKENS, 2)


@pytest.mark.parametrize(
    "hangup",
    [Hangup(at_response_start=True), Hangup(after_response_chunks=1)],
    ids=["at its head", "after its first event"],
)
async def test_client_gone_mid_stream(gw: Gateway, fakes: Fakes, hangup: Hangup) -> None:
    async def slow(call: Call) -> web.StreamResponse:
        return await stream(call, ["a", "b", "c"], stall_after=1)

    fakes.small.script = slow
    sent = await gw.post(chat(stream=True), hangup=hangup)
    assert sent.reply.status == 200
    assert sent.reply.hung_up
    settled = await gw.settled(sent.rid, status=499, cache="bypass", error="client_disconnected")
    assert settled.report.usage == TokenUsage(PROMPT_TOKENS, 1)  # billed for what was made
    (held,) = fakes.small.calls
    await asyncio.wait_for(held.closed.wait(), 2)


async def test_client_gone_as_a_coalescing_follower(gw: Gateway, fakes: Fakes) -> None:
    release, gone = asyncio.Event(), asyncio.Event()
    fakes.small.script = hang(release)
    body = chat(temperature=0)
    leader = asyncio.ensure_future(gw.post(body))
    await fakes.small.wait_for_calls(1)
    follower = asyncio.ensure_future(gw.post(body, hangup=Hangup(when=gone)))
    await gw.wait_for_follower()
    gone.set()
    left = await follower
    assert left.reply.status is None
    settled = await gw.settled(left.rid, status=499, cache="miss", error="client_disconnected")
    assert settled.report.attempts == 0
    release.set()
    await gw.settled((await leader).rid, status=200, cache="miss")
    assert len(fakes.small.calls) == 1


async def test_coalescing_leader_gone_its_follower_takes_over(gw: Gateway, fakes: Fakes) -> None:
    gone = asyncio.Event()
    fakes.small.script = in_turn(hang(asyncio.Event()), answer)
    body = chat(temperature=0)
    leader = asyncio.ensure_future(gw.post(body, hangup=Hangup(when=gone)))
    await fakes.small.wait_for_calls(1)
    follower = asyncio.ensure_future(gw.post(body))
    await gw.wait_for_follower()
    gone.set()
    left, took_over = await leader, await follower
    await gw.settled(left.rid, status=499, cache="miss", error="client_disconnected")
    settled = await gw.settled(took_over.rid, status=200, cache="miss")
    assert settled.report.attempts == 1
    assert len(fakes.small.calls) == 2


async def test_client_gone_waiting_for_an_idempotent_first(start: Start, fakes: Fakes) -> None:
    """A retry waiting on its key's first request, whose client leaves, ends then as a
    499 (as one waiting for a slot or a coalesced answer does): it is neither held until
    ``idempotency.wait_s`` runs out nor settled as the 409 (or replay) nobody reads."""
    gw = await start(idempotency={"wait_s": 2})
    release, gone = asyncio.Event(), asyncio.Event()
    fakes.small.script = hang(release)
    key = {"idempotency-key": "k-waiter"}
    first = asyncio.ensure_future(gw.post(chat(), headers=key))
    await fakes.small.wait_for_calls(1)
    waiter = asyncio.ensure_future(gw.post(chat(), headers=key, hangup=Hangup(when=gone)))
    await gw.wait_for(lambda: len(gw.traces) == 2 and gw.routed(list(gw.traces)[1]))
    gone.set()
    began = time.monotonic()
    left = await waiter
    waited = time.monotonic() - began
    release.set()
    await gw.settled((await first).rid, status=200, cache="bypass")
    settled = await gw.settled(left.rid, status=499, cache="bypass", error="client_disconnected")
    assert waited < 1, f"held {waited:.1f} s after its client left"
    assert settled.report.attempts == 0


async def test_idempotency_key_released_when_the_client_leaves_mid_stream(
    gw: Gateway, fakes: Fakes
) -> None:
    async def slow_then_whole(call: Call) -> web.StreamResponse:
        if len(fakes.small.calls) == 1:
            return await stream(call, ["a", "b", "c"], stall_after=1)
        return await answer(call)

    fakes.small.script = slow_then_whole
    key = {"idempotency-key": "k-left"}
    body = chat(stream=True)
    left = await gw.post(body, headers=key, hangup=Hangup(after_response_chunks=1))
    retried = await gw.post(body, headers=key)
    assert retried.reply.status == 200
    assert "idempotent-replayed" not in retried.reply.headers
    await gw.settled(left.rid, status=499, cache="bypass", error="client_disconnected")
    await gw.settled(retried.rid, status=200, cache="bypass")
    assert len(fakes.small.calls) == 2


async def test_cancelled_by_the_server_mid_call(gw: Gateway, fakes: Fakes) -> None:
    """A server shutting down cancels what is still running: the ``finally`` settles it
    (no answer: 499, with no error of the gateway's own) and vLLM is told."""
    fakes.small.script = hang(asyncio.Event())
    running = asyncio.ensure_future(gw.post(chat()))
    (held,) = await fakes.small.wait_for_calls(1)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    (rid,) = gw.traces
    settled = await gw.settled(rid, status=499, cache="bypass")
    assert settled.report.attempts == 1
    await asyncio.wait_for(held.closed.wait(), 2)


async def test_client_gone_before_the_answer_is_written_on_an_asgi_2_4_server(
    gw: Gateway, fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    """ASGI 2.4 lets a server raise ``OSError`` from a ``send`` after its client left
    (uvicorn's HTTP cycle drops it instead): that is a client gone, not a bug."""
    rid = "settle-asgi-2-4"
    gw.traces[rid] = uuid.uuid4().int >> 1
    gw.checked[rid] = 200
    try:
        reply = await call(
            gw.app,
            "POST",
            CHAT,
            headers={"authorization": f"Bearer {KEY}", "x-request-id": rid},
            body=orjson.dumps(chat()),
            hangup=Hangup(at_response_start=True),
            send_after_hangup="raise",
            spec_version="2.4",
        )
    finally:
        tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
        caplog.clear()  # judged here, not again after the test
    assert tracebacks == []
    assert (reply.status, reply.hung_up) == (200, True)
    gw.services.recorder.drain()
    assert [(r.request_id, r.status) for r in gw.reports] == [(rid, 200)]


# -- refused before it was routed: counted, no report, no ledger row --------------------------


@dataclass(frozen=True)
class Refusal:
    status: int
    error: str
    span: bool  # whether a span had started: only once routing begins
    send: Callable[[Gateway], Awaitable[Sent]]
    config: dict[str, Any] = field(default_factory=dict)


def _bad_key(gw: Gateway) -> Awaitable[Sent]:
    return gw.post(chat(), key="sk-not-a-key-0000")


def _malformed_json(gw: Gateway) -> Awaitable[Sent]:
    return gw.post(b'{"model": "sim-small", "messages": [')


def _cut_mid_body(gw: Gateway) -> Awaitable[Sent]:
    payload = orjson.dumps(chat("x" * 2000))
    chunks = [payload[:1000], payload[1000:]]  # content-length announces both
    return gw.post(chunks, hangup=Hangup(after_body_chunks=1))


def _stalled_body(gw: Gateway) -> Awaitable[Sent]:
    payload = orjson.dumps(chat())
    return gw.post([payload[:10]], body_complete=False)


def _too_large(gw: Gateway) -> Awaitable[Sent]:
    return gw.post(chat("x" * 2000))


def _unknown_model(gw: Gateway) -> Awaitable[Sent]:
    return gw.post({**chat(), "model": "no-such-model"})


def _tier_not_allowed(gw: Gateway) -> Awaitable[Sent]:
    return gw.post(chat(), headers={"x-tollway-tier": "large"})


REFUSALS = {
    "401 bad key": Refusal(401, "invalid_api_key", False, _bad_key),
    "400 malformed JSON": Refusal(400, "invalid_json", False, _malformed_json),
    "499 body cut mid-way": Refusal(499, "client_disconnected", False, _cut_mid_body),
    "408 body too slow": Refusal(
        408, "request_timeout", False, _stalled_body, {"limits": {"body_read_timeout_s": 0.2}}
    ),
    "413 body too large": Refusal(
        413, "payload_too_large", False, _too_large, {"limits": {"max_body_bytes": 1024}}
    ),
    "404 unknown model": Refusal(404, "model_not_found", True, _unknown_model),
    "403 tier not allowed": Refusal(403, "permission_denied", True, _tier_not_allowed),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_before_routing(
    start: Start, fakes: Fakes, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    refusal = REFUSALS[case]
    gw = await start(**refusal.config)
    sent = await refusal.send(gw)
    if refusal.status == 499:
        assert sent.reply.status is None  # nobody to answer
    else:
        assert sent.reply.status == refusal.status
        assert sent.reply.json()["error"]["code"] == refusal.error
    span = await gw.refused(sent.rid, status=refusal.status, error=refusal.error)
    assert (span is not None) == refusal.span
    samples = parse(gw.services.metrics.render()[0].decode())
    counted = value(samples, "tollway_requests_total", status=str(refusal.status), tier="none")
    assert counted == 1
    assert value(samples, "tollway_requests_total", status="500") == 0
    assert [r for r in caplog.records if r.exc_info] == []  # no traceback
    assert fakes.small.calls == []


async def test_bad_cache_header_after_routing(gw: Gateway, fakes: Fakes) -> None:
    """The cache plan is made once the request is routed: a bad ``x-tollway-cache-ttl``
    is refused after routing, so it is settled with a report (and a ledger row)."""
    sent = await gw.post(chat(temperature=0), headers={"x-tollway-cache-ttl": "soon"})
    assert sent.reply.status == 400
    await gw.settled(sent.rid, status=400, cache="miss", error="invalid_header")
    assert fakes.small.calls == []
