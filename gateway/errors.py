"""The gateway's exception tree and its one mapping to the OpenAI error shape.

    GatewayError                       -> status, OpenAI ``type`` and ``code``
    ├── InvalidRequest          400    malformed JSON, schema violations
    ├── AuthenticationFailed    401    missing or unknown API key
    ├── PermissionDenied        403    a valid key asking for what it may not see
    ├── ModelNotFound           404    model not served by any tier
    ├── RouteNotFound           404    unknown path
    ├── MethodNotAllowed        405
    ├── IdempotencyConflict     409    the first request with this key still runs
    ├── PayloadTooLarge         413    body over ``limits.max_body_bytes``
    ├── IdempotencyMismatch     422    the key was used with another body
    ├── BudgetExceeded          429    the tenant's daily or monthly budget is spent
    ├── Overloaded              429    no slot within the request's deadline (shed)
    ├── ClientDisconnected      499    client left first; nothing is sent
    ├── NoHealthyUpstream       503    every replica of a tier is down
    ├── ServiceUnavailable      503    a part the answer needs is down (the ledger)
    └── UpstreamError           502    upstream failed after retries
        └── UpstreamTimeout     504

Anything else is a bug: ``error_response`` turns it into a 500 with a generic
message and logs the traceback; a traceback never reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import orjson
from starlette.responses import Response

log = logging.getLogger("tollway.errors")

JSON = "application/json"


class GatewayError(Exception):
    status: ClassVar[int] = 500
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


class RouteNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


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


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException, request_id: str | None = None) -> Response:
    """The single place an exception becomes an HTTP response."""
    if isinstance(exc, GatewayError):
        status, body, headers = exc.status, exc.body(), exc.headers()
    else:
        log.error("unhandled error (request %s)", request_id, exc_info=exc)
        status, headers = 500, {}
        body = error_body(
            "The gateway hit an internal error; it has been logged"
            + (f" under request id {request_id}." if request_id else "."),
            "server_error",
            code="internal_error",
        )
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=JSON)
