"""The gateway's exception tree and its one mapping to the OpenAI error shape.

    GatewayError                       -> status, OpenAI ``type`` and ``code``
    ├── InvalidRequest          400    malformed JSON, schema violations
    ├── AuthenticationFailed    401    missing, unknown, revoked or expired API key
    ├── PermissionDenied        403    a valid key asking for what it may not see
    ├── ModelNotFound           404    model not served by any tier
    ├── KeyNotFound             404    no managed API key has this id (admin API)
    ├── RouteNotFound           404    unknown path
    ├── MethodNotAllowed        405
    ├── RequestTimeout          408    the body did not arrive within its read timeout
    ├── IdempotencyConflict     409    the first request with this key still runs
    ├── PayloadTooLarge         413    body over ``limits.max_body_bytes``
    ├── IdempotencyMismatch     422    the key was used with another body
    ├── BudgetExceeded          429    a daily or monthly budget (tenant's or key's) is spent
    ├── RateLimited             429    requests or tokens per minute used up (Retry-After)
    ├── RequestTooLarge         429    more tokens than a whole minute of the limit allows
    ├── Overloaded              429    no slot within the request's deadline (shed)
    ├── ClientDisconnected      499    client left first; nothing is sent
    ├── InternalError           500    a bug: logged with its trace, never shown
    ├── NoHealthyUpstream       503    every replica of a tier is down
    ├── ServiceUnavailable      503    a part the answer needs is down (the ledger)
    ├── UpstreamRefused         4xx    vLLM refused the request (its status, its message)
    └── UpstreamError           502    upstream failed after retries, or mid-stream
        └── UpstreamTimeout     504

One error value renders everywhere: ``response()`` is the HTTP answer (status,
OpenAI-shaped JSON body, headers such as ``Retry-After``), ``event()`` the SSE
error event a stream that fails mid-way sends before ``data: [DONE]``, and
``error_type`` what the request's span and report record as ``error.type``.
``as_gateway_error`` is the one place any exception becomes such a value:
anything that is not a ``GatewayError`` is a bug, an ``InternalError`` whose
traceback is logged once there; a traceback never reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger("tollway.errors")

JSON = "application/json"


class GatewayError(Exception):
    status: int = 500  # a class's; ``UpstreamRefused`` carries vLLM's per instance
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.instance_code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return error_body(
            self.message, self.type, param=self.param, code=self.instance_code or self.code
        )

    @property
    def error_type(self) -> str:
        """Low-cardinality ``error.type`` for spans and reports: the error's code."""
        return self.instance_code or self.code or type(self).__name__

    def response(self, headers: Mapping[str, str] | None = None) -> Response:
        """The HTTP answer: ``headers`` (the request's own) then the error's (Retry-After)."""
        merged = {**headers, **self.headers()} if headers else self.headers()
        return Response(orjson.dumps(self.body()), self.status, merged, media_type=JSON)

    def event(self) -> bytes:
        """The SSE ``data:`` event a stream sends when it fails mid-way."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class KeyNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "key_not_found"


class RouteNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    """The request body did not arrive within ``limits.body_read_timeout_s``."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}  # the connection's state is unknown: start afresh


class IdempotencyConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_in_use"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class IdempotencyMismatch(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class BudgetExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"

    def __init__(self, message: str, *, retry_after_s: int, remaining: dict[str, str]):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.remaining = remaining

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s), **self.remaining}


class RateLimited(GatewayError):
    """A key's or tenant's requests or tokens per minute are used up."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class RequestTooLarge(GatewayError):
    """One request may use more tokens than its tokens-per-minute limit allows in a whole
    minute: it could never be admitted, so no Retry-After (OpenAI's "Request too large")."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(GatewayError):
    """Load shedding: the tier's queue cannot admit the request within its deadline."""

    status = 429
    type = "rate_limit_error"
    code = "queue_deadline_exceeded"  # or "queue_full"

    def __init__(
        self, message: str, *, retry_after_s: int, code: str | None = None, waited: bool = False
    ):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.waited = waited  # it queued until its deadline (not a prediction)

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class ClientDisconnected(GatewayError):
    """The client went away before its answer was ready (nginx's 499); used in logs only."""

    status = 499
    type = "client_closed_request"
    code = "client_disconnected"


class InternalError(GatewayError):
    """A bug. The message names the request id the traceback was logged under."""

    status = 500
    type = "server_error"
    code = "internal_error"


class NoHealthyUpstream(GatewayError):
    status = 503
    type = "server_error"
    code = "no_healthy_upstream"

    def headers(self) -> dict[str, str]:
        return {"retry-after": "1"}


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"

    def headers(self) -> dict[str, str]:
        return {"retry-after": "5"}


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRefused(GatewayError):
    """vLLM answered 4xx (the request's fault: a prompt over the context length, a bad
    parameter): relayed with vLLM's status and its error in OpenAI's shape."""

    type = "invalid_request_error"
    code = "upstream_refused"

    def __init__(self, status: int, body: dict[str, Any]):
        inner = body["error"]
        super().__init__(inner["message"], param=inner.get("param"), code=inner.get("code"))
        self.status = status
        self._body = body

    @property
    def error_type(self) -> str:
        return f"upstream_{self.status}"

    def body(self) -> dict[str, Any]:
        return self._body


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def as_gateway_error(exc: BaseException, request_id: str | None = None) -> GatewayError:
    """The one mapping of an exception to the error the client gets.

    A client that went away (Starlette's ``ClientDisconnect`` while the body is
    read) is a ``ClientDisconnected``; anything else that is not a
    ``GatewayError`` is a bug, logged here with its traceback.
    """
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return ClientDisconnected("The client closed the connection before its request was read.")
    log.error("unhandled error (request %s)", request_id, exc_info=exc)
    return InternalError(
        "The gateway hit an internal error; it has been logged"
        + (f" under request id {request_id}." if request_id else ".")
    )


def error_response(exc: BaseException, request_id: str | None = None) -> Response:
    """An exception as its HTTP answer (``as_gateway_error``, then ``response``)."""
    return as_gateway_error(exc, request_id).response()
