"""The request pipeline: one path from an HTTP request to an upstream answer.

auth -> read body (size limit) -> parse JSON -> validate -> route to a tier
-> dispatch to a replica (retries inside the upstream client) -> relay.

Both completion endpoints share it; routes only pick the ``Endpoint``. The
client's own JSON is what goes upstream (only ``model`` is rewritten when an
alias was routed), so unknown fields reach vLLM untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import Authenticator
from gateway.disconnect import cancel_on_disconnect
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    UpstreamError,
    error_body,
)
from gateway.pool import Pools
from gateway.request_id import request_id_of
from gateway.schemas import Endpoint, validate
from gateway.streaming import EventStreamResponse, relay_events
from gateway.upstream import UpstreamClient, UpstreamReply
from router.table import Decision, RouteTable, UnknownModel

log = logging.getLogger("tollway.pipeline")

JSON = "application/json"


class Pipeline:
    def __init__(
        self,
        *,
        auth: Authenticator,
        routes: RouteTable,
        pools: Pools,
        upstream: UpstreamClient,
        max_body_bytes: int,
    ):
        self.auth = auth
        self.routes = routes
        self.pools = pools
        self.upstream = upstream
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        request_id = request_id_of(request.scope) or ""
        self.auth.authenticate(request.headers.get("authorization"))
        raw = await self._read_body(request)
        body = _parse_json(raw)
        parsed = validate(endpoint, body)
        decision = self._route(parsed.model)
        if decision.model != parsed.model:
            body["model"] = decision.model
            raw = orjson.dumps(body)
        forward = self._forward(endpoint, decision, raw, request_id, stream=parsed.stream)
        return await cancel_on_disconnect(forward, request.receive)

    async def _forward(
        self, endpoint: Endpoint, decision: Decision, raw: bytes, request_id: str, *, stream: bool
    ) -> Response:
        reply = await self.upstream.send(
            self.pools.tiers[decision.tier],
            endpoint.path,
            raw,
            {"content-type": JSON, "x-request-id": request_id},
            stream=stream,
        )
        headers = _report_headers(decision)
        if stream and reply.status == 200:
            return EventStreamResponse(relay_events(reply), headers)
        data = await reply.read()
        if reply.status != 200:
            return _upstream_failure(reply, data, headers)
        return Response(data, headers=headers, media_type=JSON)

    def _route(self, model: str) -> Decision:
        try:
            return self.routes.resolve(model)
        except UnknownModel:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
            ) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequest("The Content-Length header is not a number.")
            if int(declared) > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}.", code="invalid_json"
        ) from None


def _report_headers(decision: Decision) -> dict[str, str]:
    return {"x-tollway-tier": decision.tier, "x-tollway-model": decision.model}


def _upstream_failure(reply: UpstreamReply, data: bytes, headers: dict[str, str]) -> Response:
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
