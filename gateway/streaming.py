"""Server-sent events: relaying vLLM's stream to the client, event by event.

``relay_events`` splits the upstream bytes into SSE events and yields each
as soon as it is complete; nothing is buffered whole. If the upstream fails
mid-way (dropped connection, stall past the read timeout, an end without
``[DONE]``), the client gets an OpenAI-shaped error event and then
``data: [DONE]``, so SDK iterators end instead of hanging.

``EventStreamResponse`` sends those events and, at the same time, listens for
the client going away: a disconnect cancels the relay at once, even while it
waits for a slow or hung upstream, and the relay's cleanup closes the
upstream connection so vLLM aborts the request and frees its batch slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import aiohttp
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cache.sse import DONE, event
from gateway.disconnect import wait_for_disconnect
from gateway.errors import error_body
from gateway.stream_shaper import StreamShaper
from gateway.upstream import UpstreamReply

log = logging.getLogger("tollway.streaming")


def error_event(message: str, code: str) -> bytes:
    return event(error_body(message, "server_error", code=code))


StreamEnd = Callable[[str | None], dict[str, Any] | None]
"""Called once when a stream ends, after its replica slot is released, with the
failure reason (None on success, "client_disconnected" when the client left);
returns the ``tollway`` figures for the final event (None with metering off)."""


async def relay_events(
    reply: UpstreamReply, shaper: StreamShaper, on_end: StreamEnd
) -> AsyncGenerator[bytes, None]:
    """Yield the upstream's SSE events as they complete; end every stream with [DONE]."""
    buffer = b""
    finished = False
    failure: str | None = "client_disconnected"  # unless the loop below ends it
    try:
        async for chunk in reply.response.content.iter_any():
            buffer += chunk
            while (end := buffer.find(b"\n\n")) >= 0:
                raw, buffer = buffer[: end + 2], buffer[end + 2 :]
                if raw.startswith(b"data: [DONE]"):
                    finished = True
                    break
                for out in shaper.feed(raw):
                    yield out
            if finished:
                break
        failure = None if finished else "the upstream closed the stream before it was complete"
    except TimeoutError:
        failure = "the upstream stopped sending within the read timeout"
    except aiohttp.ClientError as exc:
        failure = f"the upstream connection failed mid-stream ({type(exc).__name__})"
    finally:
        reply.release(abort=not finished)
        tollway = on_end(failure)
    if failure is None:
        for out in shaper.finish(tollway):
            yield out
    else:
        log.warning("stream from %s ended early: %s", reply.replica.url, failure)
        yield error_event(f"The stream was interrupted: {failure}.", "upstream_stream_error")
    yield DONE


class EventStreamResponse(Response):
    """A response streaming ``events`` that cancels them when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str]):
        # Not Response.__init__: there is no body to render, only events to relay.
        self.events = events
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self._send_all(send))
        listener = asyncio.ensure_future(wait_for_disconnect(receive))
        done: set[asyncio.Future[None]] = set()
        try:
            done, _ = await asyncio.wait((sender, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, listener):
                task.cancel()
            for task in (sender, listener):
                # OSError: the client vanished while we were writing to it.
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
        if sender not in done:
            log.info("client disconnected mid-stream; upstream request cancelled")

    async def _send_all(self, send: Send) -> None:
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            await send(start)
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()
