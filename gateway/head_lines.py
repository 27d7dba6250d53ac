"""Metering's response headers as one pre-encoded block of head lines.

A metered answer carries six to eight ``x-tollway-*`` figures. As header
pairs, each is one more tuple for the response's list and one more line for
the server to check, split and join. The report spells them instead as
finished head lines, one bytes object (``RequestReport.head_lines``), and a
server that announces the ``tollway.head_lines`` ASGI extension in the
request's scope (``gateway.http_server`` does) writes that block into the
head as it is: the ASGI way to add to the protocol (a scope's
``extensions``), ignored by any server that does not announce it. With such a
server the block is split back into header pairs, so the answer on the wire is
the same either way.

The block is trusted, not checked line by line: ``metering.report`` builds it
from integers and the request id ``gateway.request_id`` admitted (a
restricted alphabet, no spaces, no line breaks).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import JSON
from metering.report import header_pairs

__all__ = ["HEAD_LINES", "FiguresResponse", "announce", "header_pairs"]

HEAD_LINES = "tollway.head_lines"  # the scope extension, and the start message's key


def announce(scope: dict[str, Any]) -> None:
    """A server's part: tell the app this request's head takes a block of lines."""
    extensions = scope.get("extensions")
    if extensions is None:
        scope["extensions"] = {HEAD_LINES: {}}
    else:
        extensions[HEAD_LINES] = {}


class FiguresResponse(Response):
    """A JSON answer whose metering figures travel as one block of head lines.

    Made as a ``Response``, then given its ``head_lines`` (no constructor of
    its own: one Python frame less on every metered answer). Reading
    ``headers`` (the idempotency layer keeps some of them) first moves the
    block into the ordinary header pairs, so the response then behaves, and is
    sent, exactly like a plain ``Response``.
    """

    media_type = JSON
    head_lines = b""

    @property
    def headers(self) -> MutableHeaders:
        if self.head_lines:
            self.raw_headers += header_pairs(self.head_lines)
            self.head_lines = b""
        return super().headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: dict[str, Any] = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        if self.head_lines:
            extensions = scope.get("extensions")
            if extensions is not None and HEAD_LINES in extensions:
                start[HEAD_LINES] = self.head_lines
            else:
                start["headers"] = self.raw_headers + header_pairs(self.head_lines)
        await send(start)
        await send({"type": "http.response.body", "body": self.body})
        if self.background is not None:
            await self.background()
