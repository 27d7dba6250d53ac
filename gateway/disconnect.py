"""Stop upstream work the moment the client goes away.

A client that times out or is killed while vLLM is still generating would
otherwise leave the GPU working for nobody. ``cancel_on_disconnect`` awaits
the forwarding step in the request's own task while one small listener task
waits on the ASGI ``receive`` channel; if ``http.disconnect`` arrives first,
the listener cancels the request's task, which closes the upstream connection,
and vLLM aborts the request and frees its batch slot. (Streams keep the same
watch while they are relayed: ``gateway.streaming``.)

One listener task per request: the request's own task does the work.
"""

from __future__ import annotations

import asyncio
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


async def _cancel_when_gone(receive: Receive, task: asyncio.Task[object], gone: list[bool]) -> None:
    await wait_for_disconnect(receive)
    gone.append(True)
    task.cancel()


async def cancel_on_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """``await work``, unless the client disconnects first: then cancel it and raise."""
    task = asyncio.current_task()
    assert task is not None
    gone: list[bool] = []
    listener = asyncio.get_running_loop().create_task(_cancel_when_gone(receive, task, gone))
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from outside (shutdown): not ours to swallow
        task.uncancel()
        raise ClientDisconnected(
            "The client closed the connection before the answer was ready."
        ) from None
    finally:
        listener.cancel()
