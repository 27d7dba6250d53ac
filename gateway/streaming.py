"""Server-sent events: relaying vLLM's stream to the client, event by event.

``relay_events`` splits the upstream bytes into SSE events and yields each
as soon as it is complete; nothing is buffered whole. If the upstream fails
mid-way (dropped connection, stall past the read timeout, an end without
``[DONE]``), the client gets the failure's error event (``GatewayError.event``)
and then ``data: [DONE]``, so SDK iterators end instead of hanging.

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

from gateway.disconnect import wait_for_disconnect
from gateway.errors import ClientDisconnected, GatewayError, UpstreamError
from gateway.sse import DONE
from gateway.stream_shaper import StreamShaper
from gateway.upstream import UpstreamReply
from gateway.upstream_errors import STREAM_ERROR, failure

log = logging.getLogger("tollway.streaming")

StreamEnd = Callable[[GatewayError | None], dict[str, Any] | None]
"""Called once when a stream ends, after its replica slot is released, with its
failure (None on success, ``ClientDisconnected`` when the client left);
returns the ``tollway`` figures for the final event (None with metering off)."""


async def relay_events(
    reply: UpstreamReply, shaper: StreamShaper, on_end: StreamEnd
) -> AsyncGenerator[bytes, None]:
    """Yield the upstream's SSE events as they complete; end every stream with [DONE]."""
    buffer = b""
    finished = False
    error: GatewayError | None = ClientDisconnected(
        "The client closed the connection mid-stream."
    )  # unless the loop below ends it
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
        error = (
            None
            if finished
            else UpstreamError(
                f"The stream was interrupted: the upstream replica {reply.replica.url} closed it.",
                code=STREAM_ERROR,
            )
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        error = failure(exc, reply.replica.url, during="streaming")
    finally:
        reply.release(abort=not finished)
        tollway = on_end(error)
    if error is None:
        for out in shaper.finish(tollway):
            yield out
    else:
        log.warning("stream from %s ended early: %s", reply.replica.url, error.message)
        yield error.event()
    yield DONE


class EventStreamResponse(Response):
    """A response streaming ``events`` that cancels them when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str]):
        # As Starlette's StreamingResponse: no body, so no content-length.
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
             "x-accel-buffering": "no", **headers}
        )  # fmt: skip

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
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()
