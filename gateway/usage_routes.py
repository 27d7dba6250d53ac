"""The usage API: ``GET /v1/usage`` (sums) read from the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from fastapi import APIRouter, Request
from starlette.responses import Response

from cache.ledger import GroupBy, LedgerUnavailable, UsageRow, totals
from gateway.errors import InvalidRequest, PermissionDenied, ServiceUnavailable
from gateway.routes import _ERRORS, _json, _services
from metering.money import fmt

router = APIRouter()


GROUPS: tuple[GroupBy, ...] = get_args(GroupBy)


def _when(value: str | None, default: datetime, param: str) -> datetime:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"'{param}' must be an ISO 8601 date or time, e.g. 2026-11-01 or 2026-11-01T13:00Z.",
            param=param,
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get(
    "/v1/usage",
    responses={
        400: _ERRORS[400],
        401: _ERRORS[401],
        403: {"description": "another tenant's usage"},
        503: {"description": "the ledger (Redis) is down"},
    },
)
async def usage(
    request: Request,
    group_by: str = "tenant",
    start: str | None = None,
    end: str | None = None,
    tenant: str | None = None,
) -> Response:
    """Sums of metered usage over ``[start, end)`` (UTC, whole hours), grouped.

    Defaults: from the start of the current UTC day to now. An admin key sees
    every tenant (or one, with ``tenant=``); any other key sees its own only.
    """
    services = _services(request)
    principal = services.auth.authenticate(request.headers.get("authorization"))
    group = next((g for g in GROUPS if g == group_by), None)
    if group is None:
        raise InvalidRequest(f"'group_by' must be one of {', '.join(GROUPS)}.", param="group_by")
    now = datetime.now(UTC)
    since = _when(start, now.replace(hour=0, minute=0, second=0, microsecond=0), "start")
    until = _when(end, now + timedelta(hours=1), "end")
    if until <= since:
        raise InvalidRequest("'end' must be after 'start'.", param="end")
    if not principal.admin:
        if tenant not in (None, principal.tenant):
            raise PermissionDenied("This API key may only read its own tenant's usage.")
        tenant = principal.tenant
    try:
        rows = await services.ledger.query(
            group_by=group,
            start=since,
            end=until,
            tenant=tenant,
        )
    except LedgerUnavailable:
        raise ServiceUnavailable("The usage ledger (Redis) is not reachable right now.") from None
    return _json(
        {
            "object": "usage",
            "group_by": group_by,
            "start": since.isoformat(),
            "end": until.isoformat(),
            "tenant": tenant,
            "data": [_usage_row(row) for row in rows],
            "total": _usage_row(totals(rows)),
        }
    )


def _usage_row(row: UsageRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_prompt_tokens": row.cached_tokens,
        "gpu_seconds": row.gpu_seconds,
        "cost_usd": fmt(row.cost_usd),
        "cost_loaded_usd": fmt(row.cost_loaded_usd),
        "saved_usd": fmt(row.saved_usd),
    }
