"""``x-request-id``: honoured when the client sends a sane one, else created; always echoed.

A pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task per
request). The id is put in ``scope["tollway.request_id"]`` for the pipeline
and added to every response's headers, errors included.
"""

from __future__ import annotations

import itertools
import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "tollway.request_id"
_SANE = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id_of(scope: Scope) -> str | None:
    value = scope.get(SCOPE_KEY)
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app
        # Unique across processes without a uuid4 per request (measurably cheaper):
        # a random per-process prefix and a counter.
        self._prefix = b"req_" + os.urandom(6).hex().encode()
        self._counter = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        if raw is None or not _SANE.match(raw):
            raw = self._prefix + b"%010x" % next(self._counter)
        scope[SCOPE_KEY] = raw.decode()
        header = (b"x-request-id", raw)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
