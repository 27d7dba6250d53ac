"""Driving an ASGI app in-process: one scripted client on the other side of ``receive``/``send``.

``call`` plays one HTTP request against an app the way a server's request
cycle does (uvicorn's, by default): the body arrives in the chunks the test
gives, then ``receive()`` blocks until the client leaves or the response is
complete, and returns ``http.disconnect`` from then on. ``send`` records the
response; once the client has left, whatever the app still sends is dropped
(uvicorn ignores it; ``send_after_hangup="raise"`` raises ``OSError`` instead,
as ASGI spec 2.4 lets a server do).

The client may leave at a chosen moment (``Hangup``): mid-body, after some
chunks; when the test sets an ``asyncio.Event``; as the response's head is
sent; after some body chunks of the response::

    reply = await call(app, "POST", "/v1/chat/completions", body=payload,
                       headers={"authorization": "Bearer sk-..."},
                       hangup=Hangup(after_response_chunks=1))
    reply.status, reply.headers["x-request-id"], reply.events

An app that raises is a test failure (the exception propagates), and so is
one that breaks the message order or runs past ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from starlette.types import ASGIApp, Message

Headers = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Hangup:
    """When the client goes away; with none set it stays until the response is complete."""

    after_body_chunks: int | None = None  # of the request body, after this many were read
    when: asyncio.Event | None = None  # once the test sets it
    at_response_start: bool = False  # right after the response's head was sent
    after_response_chunks: int | None = None  # after this many non-empty body chunks


@dataclass
class Reply:
    """What the client saw: the head and body sent before it left."""

    status: int | None = None  # None: it left before a response was started
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # the app ended the response while the client was there
    hung_up: bool = False  # the client left before the response was complete
    dropped: int = 0  # messages the app sent after the client left

    @property
    def headers(self) -> dict[str, str]:
        """Lower-case names; a repeated header's values joined with ", "."""
        out: dict[str, str] = {}
        for name, value in self.raw_headers:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            out[key] = f"{out[key]}, {text}" if key in out else text
        return out

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def events(self) -> list[Any]:
        """The body's server-sent ``data:`` payloads: parsed JSON, or the text (``[DONE]``)."""
        return sse_events(self.body)


def sse_events(body: bytes) -> list[Any]:
    events: list[Any] = []
    for raw in body.split(b"\n\n"):
        lines = [line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            continue
        data = b"\n".join(lines)
        try:
            events.append(orjson.loads(data))
        except orjson.JSONDecodeError:
            events.append(data.decode())
    return events


class _Client:
    def __init__(
        self,
        chunks: Sequence[bytes],
        body_complete: bool,
        hangup: Hangup,
        send_after_hangup: Literal["drop", "raise"],
    ):
        self.chunks = list(chunks) or [b""]
        self.body_complete = body_complete
        self.hangup = hangup
        self.send_after_hangup = send_after_hangup
        self.read = 0  # request body chunks handed to the app
        self.sent = 0  # non-empty response body chunks
        self.gone = False
        self.ended = asyncio.Event()  # the client left, or the response is complete
        self.reply = Reply()

    def leave(self) -> None:
        if not self.reply.complete:
            self.gone = self.reply.hung_up = True
        self.ended.set()

    async def receive(self) -> Message:
        if not self.ended.is_set() and self.read < len(self.chunks):
            limit = self.hangup.after_body_chunks
            if limit is not None and self.read >= limit:
                self.leave()
            else:
                chunk = self.chunks[self.read]
                self.read += 1
                more = self.read < len(self.chunks) or not self.body_complete
                return {"type": "http.request", "body": chunk, "more_body": more}
        await self.ended.wait()  # nothing more to read: wait for the end, as a server does
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        reply = self.reply
        if self.gone:
            reply.dropped += 1
            if self.send_after_hangup == "raise":
                raise OSError("the client closed the connection")
            return
        kind = message["type"]
        if reply.complete:
            raise RuntimeError(f"{kind} sent after the response was complete")
        if kind == "http.response.start":
            if reply.status is not None:
                raise RuntimeError("http.response.start sent twice")
            reply.status = int(message["status"])
            reply.raw_headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            if self.hangup.at_response_start:
                self.leave()
            return
        if kind != "http.response.body" or reply.status is None:
            raise RuntimeError(f"unexpected {kind} (response started: {reply.status is not None})")
        body = bytes(message.get("body", b""))
        reply.body += body
        if not message.get("more_body", False):
            reply.complete = True
            self.ended.set()
            return
        if body:
            self.sent += 1
            limit = self.hangup.after_response_chunks
            if limit is not None and self.sent >= limit:
                self.leave()

    async def watch(self, event: asyncio.Event) -> None:
        await event.wait()
        self.leave()


def _raw_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items]


async def call(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    headers: Headers = (),
    body: bytes | Sequence[bytes] = b"",
    content_length: int | None = None,
    body_complete: bool = True,
    hangup: Hangup | None = None,
    send_after_hangup: Literal["drop", "raise"] = "drop",
    spec_version: str = "2.3",
    timeout_s: float = 10.0,
) -> Reply:
    """Run one request through ``app``; the client's view of the response.

    ``body``: bytes, or the chunks it arrives in. ``content-length`` is set to
    the whole body's size (``content_length`` announces another, say for a
    client that will hang up mid-body) unless ``headers`` have one.
    ``body_complete=False``: the last chunk says more is coming, and none does
    (a stalled upload). ``spec_version``: the ASGI HTTP spec the scope claims
    (uvicorn's httptools cycle says 2.3).
    """
    chunks = [body] if isinstance(body, bytes) else list(body)
    raw = _raw_headers(headers)
    if not any(name == b"content-length" for name, _ in raw):
        size = sum(map(len, chunks)) if content_length is None else content_length
        if size or content_length is not None:
            raw.append((b"content-length", str(size).encode()))
    path_only, _, query = path.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path_only,
        "raw_path": path_only.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    client = _Client(chunks, body_complete, hangup or Hangup(), send_after_hangup)
    watcher = None
    if client.hangup.when is not None:
        watcher = asyncio.ensure_future(client.watch(client.hangup.when))
    try:
        async with asyncio.timeout(timeout_s):
            await app(scope, client.receive, client.send)
    finally:
        client.ended.set()  # as a server does once the app returns: the cycle is over
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return client.reply
