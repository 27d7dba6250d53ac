"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools one, header lines in one pass.

uvicorn checks each response header line with two regular expressions, lowers
its name and compares it with three special names, one line at a time: about
a microsecond a line, and a metered answer carries fourteen of them
(bench/RESULTS.md, 2026-11-23). ``OnePassCycle.send`` does the same checks on
all the lines at once: the bytes either expression rejects deleted from the
joined names and from the joined values by ``bytes.translate`` (a length that
changes means a bad byte), the special names found by a set intersection, the
lines joined in C. It handles
the common start of a response; anything else (uppercase names, a
``connection`` or ``transfer-encoding`` header, a repeated ``content-length``,
a paused or closed transport, access logging, every body message) is
uvicorn's own code, unchanged, so the bytes on the wire are the same.

It also announces the ``tollway.head_lines`` ASGI extension
(``gateway.head_lines``): a response may hand its metering figures as one
block of finished head lines, written after the checked lines as it is (or,
on uvicorn's own path, turned back into header pairs first).

uvicorn is pinned (pyproject.toml): ``OnePassProtocol`` hooks its
``_start_asgi_task``, and ``tests/gateway/test_http_server.py`` fails if the
hook stops being called.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway.head_lines import HEAD_LINES, announce, header_pairs

_NAME = itemgetter(0)
_VALUE = itemgetter(1)
_CONTENT_LENGTH = b"content-length"
_SPECIAL = frozenset({_CONTENT_LENGTH, b"transfer-encoding", b"connection"})
_HANDLED = frozenset({_CONTENT_LENGTH})  # the other special names go to uvicorn's loop
_LINE_END = b"\r\n"
_NAME_VALUE = b": "
# The bytes uvicorn's two expressions reject, read off the expressions themselves:
# ``translate`` deletes them from a copy in one C loop over a 256-entry table, three
# times cheaper than the expressions' search over the same bytes (measured).
_BAD_NAME = bytes(b for b in range(256) if HEADER_RE.search(bytes((b,))))
_BAD_VALUE = bytes(b for b in range(256) if HEADER_VALUE_RE.search(bytes((b,))))


class OnePassCycle(RequestResponseCycle):
    """A request-response cycle whose response head is checked and written in one pass."""

    async def send(self, message: Any) -> None:
        block = message.get(HEAD_LINES)  # a block of finished head lines (gateway.head_lines)
        if (
            self.response_started
            or message["type"] != "http.response.start"
            or self.access_log
            or self.disconnected
            or self.flow.write_paused
        ):
            await super().send(_as_pairs(message, block))
            return
        headers = self.default_headers + list(message.get("headers", ()))
        names = list(map(_NAME, headers))
        joined = b"".join(names)
        special = _SPECIAL.intersection(names)
        values = b"\t".join(map(_VALUE, headers))  # a tab is allowed in a value
        if (
            not headers
            or not joined.islower()
            or not special <= _HANDLED
            or names.count(_CONTENT_LENGTH) > 1
            or len(joined.translate(None, _BAD_NAME)) != len(joined)
            or len(values.translate(None, _BAD_VALUE)) != len(values)
        ):
            await super().send(_as_pairs(message, block))  # its checks, errors, exact behaviour
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = message["status"]
        if special and self.chunked_encoding is None:  # a content-length header
            self.expected_content_length = int(headers[names.index(_CONTENT_LENGTH)][1].decode())
            self.chunked_encoding = False
        content = [STATUS_LINE[status_code], _LINE_END.join(map(_NAME_VALUE.join, headers))]
        content.append(_LINE_END)
        if block:
            content.append(block)
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status_code not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(_LINE_END)
        self.transport.write(b"".join(content))


class OnePassProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, whose cycles write their response head in one pass."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = OnePassCycle  # same fields, one method more specific
            announce(cycle.scope)  # type: ignore[arg-type]
        super()._start_asgi_task(cycle, app)


def _as_pairs(message: Any, block: bytes | None) -> Any:
    """``message`` for uvicorn's own code: a block of head lines back as header pairs."""
    if block is None:
        return message
    message = {k: v for k, v in message.items() if k != HEAD_LINES}
    message["headers"] = [*message.get("headers", ()), *header_pairs(block)]
    return message
