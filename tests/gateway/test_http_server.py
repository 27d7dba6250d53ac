"""OnePassCycle writes the same response head as uvicorn's own cycle, and the server uses it."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import aiohttp
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, RequestResponseCycle

from gateway.head_lines import HEAD_LINES, FiguresResponse, header_pairs
from gateway.http_server import _BAD_NAME, _BAD_VALUE, OnePassCycle, OnePassProtocol
from metering.pricing import Cost
from metering.report import RequestReport
from metering.usage import TokenUsage


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


class Flow:
    write_paused = False


def cycle(kind: type[RequestResponseCycle], method: str, keep_alive: bool) -> Any:
    scope = {"type": "http", "method": method, "path": "/", "headers": []}
    return kind(
        scope=scope,  # type: ignore[arg-type]
        transport=Transport(),  # type: ignore[arg-type]
        flow=Flow(),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[(b"server", b"uvicorn"), (b"date", b"Sun, 22 Nov 2026 00:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


async def start_both(
    headers: list[tuple[bytes, bytes]],
    status: int,
    method: str,
    keep_alive: bool,
    block: bytes = b"",
) -> list[tuple[Any, Any]]:
    """Each cycle's outcome: (written bytes and state) or the exception it raised.

    With a ``block`` of head lines, uvicorn's cycle gets them as header pairs
    after ``headers``, and ours as the block (``gateway.head_lines``).
    """
    outcomes = []
    for kind in (RequestResponseCycle, OnePassCycle):
        c = cycle(kind, method, keep_alive)
        message: dict[str, Any] = {"type": "http.response.start", "status": status}
        if block and kind is OnePassCycle:
            message.update(headers=headers, **{HEAD_LINES: block})
        else:
            message["headers"] = [*headers, *header_pairs(block)]
        try:
            await c.send(message)
        except Exception as exc:  # noqa: BLE001 - compared below
            outcomes.append((type(exc), str(exc)))
            continue
        state = (c.response_started, c.chunked_encoding, c.keep_alive)
        outcomes.append((b"".join(c.transport.written), (state, c.expected_content_length)))
    return outcomes


NAMES = st.binary(min_size=1, max_size=4) | st.sampled_from(
    [
        b"content-type",
        b"content-length",
        b"x-tollway-cost-usd",
        b"x-request-id",
        b"X-Upper",
        b"connection",
        b"transfer-encoding",
        b"bad name",
        b"bad:name",
        b"x-\x01",
    ]
)
VALUES = st.binary(max_size=4) | st.sampled_from(
    [b"12", b"0", b"application/json", b"0.000123456", b"close", b"chunked", b"a\tb", b"a\nb", b""]
)


@settings(max_examples=400, deadline=None)
@given(
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=8),
    status=st.sampled_from([200, 204, 304, 404, 429, 500]),
    method=st.sampled_from(["GET", "POST", "HEAD"]),
    keep_alive=st.booleans(),
)
def test_the_head_on_the_wire_is_uvicorns(
    headers: list[tuple[bytes, bytes]], status: int, method: str, keep_alive: bool
) -> None:
    ours, theirs = asyncio.run(start_both(headers, status, method, keep_alive))[::-1]
    assert ours == theirs


REPORTS = st.builds(
    RequestReport,
    request_id=st.from_regex(r"[A-Za-z0-9._:/+=-]{1,20}", fullmatch=True),
    tenant=st.just("t"),
    tier=st.just("small"),
    model=st.just("m"),
    operation=st.just("chat"),
    usage=st.builds(TokenUsage, st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 9)),
    gpu_us=st.integers(0, 10**12),
    cost=st.builds(Cost, st.integers(-(10**6), 10**15), st.integers(0, 10**15)),
    cache=st.sampled_from(["miss", "hit", "replay"]),
    saved_nanos=st.integers(0, 10**12),
)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=6),
    report=REPORTS,
    status=st.sampled_from([200, 204, 404, 429]),
    method=st.sampled_from(["POST", "HEAD"]),
    keep_alive=st.booleans(),
)
def test_a_block_of_head_lines_goes_on_the_wire_as_its_header_pairs_would(
    headers: list[tuple[bytes, bytes]],
    report: RequestReport,
    status: int,
    method: str,
    keep_alive: bool,
) -> None:
    block = report.head_lines()
    assert header_pairs(block) == report.raw_headers()
    ours, theirs = asyncio.run(start_both(headers, status, method, keep_alive, block))[::-1]
    assert ours == theirs


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


BLOCK = b"x-tollway-prompt-tokens: 12\r\nx-tollway-cost-usd: 0.000000120\r\n"
PAIRS = [(b"x-tollway-prompt-tokens", b"12"), (b"x-tollway-cost-usd", b"0.000000120")]


async def test_a_figures_response_sends_its_block_only_to_a_server_that_announces_it() -> None:
    plain, announced = Sent(), Sent()
    response = FiguresResponse(b"{}", 200, {"x-tollway-tier": "small"})
    response.head_lines = BLOCK
    await response({"type": "http"}, receive, plain)
    await response({"type": "http", "extensions": {HEAD_LINES: {}}}, receive, announced)
    start = plain.messages[0]
    assert HEAD_LINES not in start
    assert start["headers"][-2:] == PAIRS
    assert (b"x-tollway-tier", b"small") in start["headers"]
    assert (b"content-type", b"application/json") in start["headers"]
    start = announced.messages[0]
    assert start[HEAD_LINES] == BLOCK
    assert not set(PAIRS) & set(start["headers"])
    assert [m["body"] for m in (plain.messages[1], announced.messages[1])] == [b"{}", b"{}"]


async def test_reading_a_figures_responses_headers_moves_its_block_into_them() -> None:
    response = FiguresResponse(b"{}")
    response.head_lines = BLOCK
    assert response.headers["x-tollway-cost-usd"] == "0.000000120"
    assert response.head_lines == b""
    sent = Sent()
    await response({"type": "http", "extensions": {HEAD_LINES: {}}}, receive, sent)
    assert HEAD_LINES not in sent.messages[0]
    assert sent.messages[0]["headers"][-2:] == PAIRS


def test_the_bytes_refused_are_uvicorns_own() -> None:
    for byte in range(256):
        line = bytes((byte,))
        assert (byte in _BAD_NAME) == bool(HEADER_RE.search(line))
        assert (byte in _BAD_VALUE) == bool(HEADER_VALUE_RE.search(line))


def test_a_metered_answer_takes_the_one_pass() -> None:
    headers = [
        (b"content-length", b"321"),
        (b"content-type", b"application/json"),
        (b"x-tollway-tier", b"small"),
        (b"x-tollway-cost-usd", b"0.000012345"),
    ]
    c = cycle(OnePassCycle, "POST", True)
    sent: list[bool] = []
    original = RequestResponseCycle.send

    async def spy(self: Any, message: Any) -> None:  # uvicorn's own send, if ever reached
        sent.append(True)
        await original(self, message)

    RequestResponseCycle.send = spy  # type: ignore[method-assign]
    try:
        asyncio.run(c.send({"type": "http.response.start", "status": 200, "headers": headers}))
    finally:
        RequestResponseCycle.send = original  # type: ignore[method-assign]
    assert sent == []
    head = b"".join(c.transport.written)
    assert head.startswith(b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\n")
    assert b"\r\nx-tollway-cost-usd: 0.000012345\r\n\r\n" in head
    assert (c.expected_content_length, c.chunked_encoding) == (321, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_the_server_runs_its_requests_in_one_pass_cycles() -> None:
    seen: list[type] = []
    announced: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(type(send.__self__))  # the cycle serving this request
        announced.append(HEAD_LINES in scope["extensions"])
        headers = [(b"content-type", b"text/plain"), (b"x-tollway-tier", b"small")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=OnePassProtocol, lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # keep-alive: later requests reuse the connection
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    assert response.status == 200
                    assert response.headers["x-tollway-tier"] == "small"
                    assert await response.read() == b"ok"  # chunked, decoded
    finally:
        server.should_exit = True
        await task
    assert seen == [OnePassCycle] * 3
    assert announced == [True] * 3


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_body_without_length_is_chunked_except_for_head(method: str) -> None:
    ours, theirs = asyncio.run(
        start_both([(b"content-type", b"text/event-stream")], 200, method, True)
    )[::-1]
    assert ours == theirs
    assert (b"transfer-encoding: chunked" in ours[0]) == (method == "GET")
