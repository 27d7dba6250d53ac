"""The client's connection: waiting on the engine while watching it, and cutting it.

Under `handler_cancellation=True` (`sim.server.SimServer`, the CLI, aiohttp's
`TestServer`) aiohttp cancels a handler as soon as its connection drops, which
is what frees a batch slot at once. With a runner that does not cancel,
`wait_watching` polls the transport every `POLL_S` and stream writes fail, so
slots are still freed, a little later.
"""

from __future__ import annotations

import asyncio
import enum

from aiohttp import web

POLL_S = 0.25
# Status of answers nobody will read (nginx's "client closed request"), for the access log.
CLIENT_GONE_STATUS = 499


class Outcome(enum.Enum):
    """How a completion request ended; the values name `RequestStats` counters."""

    FINISHED = "finished"
    REJECTED = "rejected"
    FAILED = "failed"
    ABORTED = "aborted"
    DROPPED = "dropped"


class ClientGone(Exception):
    """The client closed the connection while we were waiting."""


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def wait_watching(event: asyncio.Event, request: web.Request) -> None:
    """Wait for `event`; raise ClientGone if the client disconnects first."""
    while not event.is_set():
        try:
            async with asyncio.timeout(POLL_S):
                await event.wait()
        except TimeoutError:
            if client_gone(request):
                raise ClientGone from None


def drop_connection(request: web.Request) -> None:
    """Cut the TCP connection without a word, as a crashing backend would."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def unread() -> web.Response:
    """The answer to a client that is gone (aiohttp still wants a response object)."""
    return web.Response(status=CLIENT_GONE_STATUS)
