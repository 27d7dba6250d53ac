"""Stop upstream work the moment the client goes away.

A client that times out or is killed while vLLM is still generating would
otherwise leave the GPU working for nobody. ``cancel_on_disconnect`` runs
the forwarding step beside a listener on the ASGI ``receive`` channel; when
``http.disconnect`` arrives first, the step is cancelled, which closes the
upstream connection, and vLLM aborts the request and frees its batch slot.
(Streams keep the same watch while they are relayed: ``gateway.streaming``.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from gateway.errors import ClientDisconnected

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """``await work``, unless the client disconnects first: then cancel it and raise."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected("The client closed the connection before the answer was ready.")
    return task.result()
