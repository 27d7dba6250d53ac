"""Upstream failures as tollway errors: the one table.

Two kinds of failure reach the gateway from a vLLM replica:

- an answer that is not a success (``refusal``): vLLM's 4xx (the request's
  fault: a prompt over the context length, a bad parameter) keep their status
  and message as an ``UpstreamRefused``; its 5xx become a 502 naming the
  replica. New vLLM nests the error under ``"error"``; old vLLM did not.
- an exception from aiohttp (``failure``, ``outcome``): cannot connect, a
  dropped connection, nothing sent in time. The upstream client, a reply's
  body and a relayed stream all classify them here.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from gateway.errors import GatewayError, UpstreamError, UpstreamRefused, UpstreamTimeout, error_body

STREAM_ERROR = "upstream_stream_error"  # the code of a stream's mid-way failure


def refusal(status: int, data: bytes, replica_url: str) -> GatewayError:
    """vLLM's non-200 answer: its 4xx relayed in OpenAI's shape, its 5xx a 502."""
    body = _error_body(data)
    if not 400 <= status < 500:
        message = body["error"]["message"] if body else f"The upstream answered HTTP {status}."
        return UpstreamError(f"The upstream replica {replica_url} failed: {message}")
    if body is None:
        body = error_body(f"The upstream answered HTTP {status}.", "invalid_request_error")
    return UpstreamRefused(status, body)


def outcome(exc: BaseException) -> str:
    """An attempt's outcome label (``tollway_upstream_attempts_total``) for an exception."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "connect_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError):
        return "dropped"
    return "error"


def failure(exc: BaseException, replica_url: str, *, during: str) -> UpstreamError:
    """An aiohttp exception (or a timeout) as the error a client gets. ``during`` says
    what the gateway was doing: "connecting", "answering", "streaming"."""
    kind = outcome(exc)
    replica = f"the upstream replica {replica_url}"
    if kind == "connect_error":
        return UpstreamError(f"Cannot connect to {replica}: {describe(exc)}.")
    what = "sent nothing in time" if kind == "timeout" else f"failed: {describe(exc)}"
    code = None
    if during == "streaming":  # after a 200 and some events: said in an SSE error event
        message, code = f"The stream was interrupted: {replica} {what}.", STREAM_ERROR
    else:
        message = f"{replica[0].upper()}{replica[1:]} {what} while {during}."
    error = UpstreamTimeout if kind == "timeout" else UpstreamError
    return error(message, code=code)


def describe(exc: BaseException) -> str:
    """A short, log-friendly reason: "Connection refused", not the connector's repr."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or str(exc.os_error) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _error_body(data: bytes) -> dict[str, Any] | None:
    """vLLM's error JSON in OpenAI's shape: new vLLM nests it under "error", old vLLM did not."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    nested = parsed.get("error")
    inner: dict[str, Any] = nested if isinstance(nested, dict) else parsed
    if not isinstance(inner.get("message"), str):
        return None
    code = inner.get("code")
    return error_body(
        inner["message"],
        str(inner.get("type") or "invalid_request_error"),
        param=inner.get("param") if isinstance(inner.get("param"), str) else None,
        code=None if code is None else str(code),
    )
