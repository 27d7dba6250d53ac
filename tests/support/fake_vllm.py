"""A scriptable vLLM replica for in-process tests: a function from request to response.

In the style of httpx's ``MockTransport``, but behind a real socket: the
gateway's upstream client is aiohttp, so the function is served by aiohttp's
own test server on 127.0.0.1, and pooling, timeouts and dropped connections
are the real thing::

    async def script(call: Call) -> web.StreamResponse:
        return await answer(call, ["Hel", "lo"])  # whole, or streamed if it asked

    async with FakeVllm(script) as vllm:  # vllm.url is http://127.0.0.1:PORT
        ...
        assert vllm.calls[0].body["model"] == "sim-small"

``GET /health`` answers ``health_status`` (200) and ``GET /metrics`` 404 (the
gateway reads vLLM's load where it finds it and does without). Completions,
chat and text, go to ``script``, which a test may swap at any time. The
builders answer as vLLM does: its JSON with ``usage``
(``completion``), its SSE chunks with usage as ``stream_options`` ask
(``stream``: ``include_usage`` adds the final ``choices: []`` chunk,
``continuous_usage_stats`` the cumulative usage on every chunk), its error
body (``vllm_error``). ``hang`` holds a call until the test sets an event;
``stream`` can stall or cut the connection mid-way.

A call whose connection the gateway dropped before its answer ended has
``closed`` set: aiohttp's test server cancels the handler when its client
goes away, as vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import RawTestServer

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
PROMPT_TOKENS = 7  # every answer's, unless a builder is told otherwise
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


@dataclass(eq=False)
class Call:
    """One completion request as the replica received it."""

    request: web.BaseRequest
    body: dict[str, Any]
    shutdown: asyncio.Event  # the fake is closing: anything held lets go
    id: str  # the completion's, as vLLM names it
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the gateway hung up

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def chat(self) -> bool:
        return self.path == "/v1/chat/completions"

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def model(self) -> str:
        return str(self.body.get("model"))

    @property
    def stream_options(self) -> dict[str, Any]:
        options = self.body.get("stream_options")
        return options if isinstance(options, dict) else {}


Script = Callable[[Call], Awaitable[web.StreamResponse]]


class FakeVllm:
    def __init__(self, script: Script | None = None, *, health_status: int = 200):
        self.script: Script = script or answer
        self.health_status = health_status
        self.calls: list[Call] = []
        self._arrived = asyncio.Condition()
        self._shutdown = asyncio.Event()
        self._server = RawTestServer(self._handle, host="127.0.0.1")
        self._url: str | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; still the same after ``close`` (a replica that is down)."""
        if self._url is None:
            raise RuntimeError("FakeVllm.start() was not awaited")
        return self._url

    async def start(self) -> None:
        await self._server.start_server()
        self._url = str(self._server.make_url("")).rstrip("/")

    async def close(self) -> None:
        """Stop listening: from now on the port refuses connections."""
        self._shutdown.set()
        await self._server.close()

    async def __aenter__(self) -> FakeVllm:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_for_calls(self, count: int, timeout_s: float = 5.0) -> list[Call]:
        """The first ``count`` calls, once they have arrived."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.calls) >= count)
        return self.calls[:count]

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/health":
            return web.Response(status=self.health_status)
        if request.method != "POST" or request.path not in COMPLETION_PATHS:
            return web.Response(status=404)
        body = orjson.loads(await request.read())
        call = Call(request, body, self._shutdown, f"cmpl-fake-{len(self.calls) + 1}")
        async with self._arrived:
            self.calls.append(call)
            self._arrived.notify_all()
        try:
            return await self.script(call)
        except asyncio.CancelledError:
            call.closed.set()
            raise


# -- answers -------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def completion_body(
    call: Call,
    tokens: Sequence[str] = ("Hello", " there"),
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    """vLLM's whole answer: one choice, ``usage`` with one completion token per item."""
    text = "".join(tokens)
    choice: dict[str, Any]
    if call.chat:
        message = {"role": "assistant", "content": text, "tool_calls": []}
        choice = {"index": 0, "message": message, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    choice.update(finish_reason=finish_reason, stop_reason=None)
    return {
        "id": call.id,
        "object": "chat.completion" if call.chat else "text_completion",
        "created": 1_700_000_000,
        "model": call.model,
        "choices": [choice],
        "usage": {**usage(prompt_tokens, len(tokens)), "prompt_tokens_details": None},
    }


def completion(
    call: Call,
    tokens: Sequence[str] = ("Hello", " there"),
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    finish_reason: str = "stop",
) -> web.Response:
    body = completion_body(call, tokens, prompt_tokens=prompt_tokens, finish_reason=finish_reason)
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def stream(
    call: Call,
    tokens: Sequence[str] = ("Hello", " there"),
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    finish_reason: str = "stop",
    cut_after: int | None = None,
    stall_after: int | None = None,
    resume: asyncio.Event | None = None,
) -> web.StreamResponse:
    """vLLM's stream: a role chunk (chat), a chunk per token, the finish reason on the
    last, the usage chunk if asked, ``[DONE]``.

    ``cut_after``: drop the connection after that many token chunks, without
    ``[DONE]``, as a crashing replica does. ``stall_after``: after that many,
    wait for ``resume`` (never, without one) before going on.
    """
    response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
    await response.prepare(call.request)
    try:
        await _write_stream(
            call, response, tokens, prompt_tokens, finish_reason, cut_after, stall_after, resume
        )
    except ConnectionError:  # the gateway hung up between two writes
        call.closed.set()
    return response


async def _write_stream(
    call: Call,
    response: web.StreamResponse,
    tokens: Sequence[str],
    prompt_tokens: int,
    finish_reason: str,
    cut_after: int | None,
    stall_after: int | None,
    resume: asyncio.Event | None,
) -> None:
    options = call.stream_options
    continuous = bool(options.get("continuous_usage_stats"))
    head = {
        "id": call.id,
        "object": "chat.completion.chunk" if call.chat else "text_completion",
        "created": 1_700_000_000,
        "model": call.model,
    }
    if call.chat:
        role: dict[str, Any] = {**head, "choices": [_choice(call, None, role=True)]}
        if continuous:
            role["usage"] = usage(prompt_tokens, 0)
        await response.write(_event(role))
    for sent, token in enumerate(tokens, start=1):
        if cut_after is not None and sent > cut_after:
            _drop(call.request)
            return
        if stall_after is not None and sent > stall_after:
            stall_after = None
            await _either(resume or asyncio.Event(), call.shutdown)
        reason = finish_reason if sent == len(tokens) else None
        chunk: dict[str, Any] = {**head, "choices": [_choice(call, token, reason=reason)]}
        if continuous:
            chunk["usage"] = usage(prompt_tokens, sent)
        await response.write(_event(chunk))
    if cut_after is not None:  # fewer tokens than that: still cut, before [DONE]
        _drop(call.request)
        return
    if options.get("include_usage"):
        final: dict[str, Any] = {**head, "choices": [], "usage": usage(prompt_tokens, len(tokens))}
        await response.write(_event(final))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


def _choice(
    call: Call, token: str | None, *, reason: str | None = None, role: bool = False
) -> dict[str, Any]:
    if not call.chat:
        return {"index": 0, "text": token or "", "logprobs": None, "finish_reason": reason}
    delta = {"role": "assistant", "content": ""} if role else {"content": token}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}


def _drop(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def answer(call: Call, tokens: Sequence[str] = ("Hello", " there")) -> web.StreamResponse:
    """What vLLM answers: the whole completion, or a stream if the call asked for one."""
    if call.stream:
        return await stream(call, tokens)
    return completion(call, tokens)


def vllm_error(status: int, message: str, *, param: str | None = None) -> web.Response:
    """vLLM's error body (nested under ``error``, as vLLM >= 0.10 sends it)."""
    error: dict[str, Any] = {
        "message": message,
        "type": _ERROR_TYPES.get(status, "BadRequestError"),
        "param": param,
        "code": status,
    }
    return web.Response(
        status=status, body=orjson.dumps({"error": error}), content_type="application/json"
    )


def hang(until: asyncio.Event, then: Script = answer) -> Script:
    """A script holding each call until ``until`` is set (or the fake closes), then ``then``."""

    async def held(call: Call) -> web.StreamResponse:
        await _either(until, call.shutdown)
        if call.shutdown.is_set():
            return web.Response(status=503)
        return await then(call)

    return held


def stall_body(until: asyncio.Event) -> Script:
    """Send a whole answer's head and half its JSON, then wait for ``until``."""

    async def stalled(call: Call) -> web.StreamResponse:
        data = orjson.dumps(completion_body(call))
        response = web.StreamResponse(headers={"content-type": "application/json"})
        response.content_length = len(data)
        await response.prepare(call.request)
        try:
            await response.write(data[: len(data) // 2])
            await _either(until, call.shutdown)
            await response.write(data[len(data) // 2 :])
            await response.write_eof()
        except ConnectionError:
            call.closed.set()
        return response

    return stalled


def in_turn(*scripts: Script) -> Script:
    """The n-th call gets the n-th script; calls past the last get the last."""
    calls = itertools.count()

    async def turn(call: Call) -> web.StreamResponse:
        return await scripts[min(next(calls), len(scripts) - 1)](call)

    return turn


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
