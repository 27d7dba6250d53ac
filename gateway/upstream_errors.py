"""vLLM's error answers, relayed in OpenAI's error shape.

vLLM's 4xx (the client's fault: a prompt over the context length, a bad
parameter) keep their status and message; its 5xx become a 502 naming the
replica. New vLLM nests the error under ``"error"``; old vLLM did not.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from gateway.errors import JSON, GatewayError, UpstreamError, error_body
from gateway.upstream import UpstreamReply


def upstream_failure(reply: UpstreamReply, data: bytes, headers: dict[str, str]) -> Response:
    """Relay vLLM's 4xx (the client's fault) in OpenAI shape; turn its 5xx into a 502."""
    message = _upstream_message(data) or f"The upstream answered HTTP {reply.status}."
    if reply.status >= 500:
        error: GatewayError = UpstreamError(
            f"The upstream replica {reply.replica.url} failed: {message}"
        )
        status = error.status
        body = error.body()
    else:
        status = reply.status
        body = _upstream_error_body(data) or error_body(message, "invalid_request_error")
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=JSON)


def _upstream_error_body(data: bytes) -> dict[str, Any] | None:
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


def _upstream_message(data: bytes) -> str | None:
    body = _upstream_error_body(data)
    return None if body is None else str(body["error"]["message"])
