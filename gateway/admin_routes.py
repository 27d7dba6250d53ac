"""The admin API: managed API keys (``/admin/keys``), for admin keys only.

::

    POST   /admin/keys              201  a new key, with its secret (shown this once)
    GET    /admin/keys              200  ?tenant=  ?include_revoked=true
    GET    /admin/keys/{id}         200
    DELETE /admin/keys/{id}         200  revoked (a key revoked before stays as it was)
    POST   /admin/keys/{id}/rotate  201  a new key with the same attributes, with its
                                         secret; the old one is revoked now, or expires
                                         after ``{"grace_s": N}``

A change is written to PostgreSQL and applied to this gateway's keys at once;
the others see it on their next poll (``auth.refresh_s``). Errors: 401 no or
a bad key, 403 not an admin key (a config key with ``admin: true``), 400 a bad
body (tier and model names must be the config's; a new tenant is fine), 404
an unknown id, 503 no database configured or it is down. A key's budgets and
rate limits are enforced like its tenant's (``gateway.budgets``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.responses import Response

from gateway.config import ApiKey, format_validation_error
from gateway.errors import (
    InvalidRequest,
    KeyNotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from gateway.routes import _ERRORS, _json, _services
from gateway.services import Services
from ledger import key_store
from ledger.database import UNREACHABLE
from ledger.key_store import KeySpec, KeyStore, StoredKey
from metering.money import fmt

router = APIRouter(prefix="/admin/keys")

_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _ERRORS[400],
    401: _ERRORS[401],
    403: {"description": "not an admin key"},
    404: {"description": "no key has this id"},
    503: {"description": "no database configured, or it is down"},
}
_MAX_METADATA_BYTES = 16 * 1024

# The same rules as a config key's tenant, priority and limits (gateway.config.ApiKey).
Tenant = Annotated[str, ApiKey.model_fields["tenant"]]
Priority = Annotated[int | None, ApiKey.model_fields["priority"]]
_INT_MAX = 2**31 - 1  # the limits' columns are PostgreSQL integers
RequestsPerMinute = Annotated[
    int | None, ApiKey.model_fields["requests_per_minute"], Field(le=_INT_MAX)
]
TokensPerMinute = Annotated[
    int | None, ApiKey.model_fields["tokens_per_minute"], Field(le=_INT_MAX)
]
Usd = Annotated[Decimal, Field(ge=0, max_digits=20, decimal_places=9)]
Names = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class NewKey(BaseModel):
    """``POST /admin/keys``: what the key may do. Omitted lists mean any model, any tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    tenant: Tenant
    priority: Priority = None
    force_tier: bool = False
    allowed_models: Names | None = None
    allowed_tiers: Names | None = None
    daily_usd: Usd | None = None
    monthly_usd: Usd | None = None
    requests_per_minute: RequestsPerMinute = None
    tokens_per_minute: TokensPerMinute = None
    expires_at: AwareDatetime | None = None
    expires_in_s: float | None = Field(default=None, gt=0)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> NewKey:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give expires_at or expires_in_s, not both")
        if len(orjson.dumps(self.metadata)) > _MAX_METADATA_BYTES:
            raise ValueError(f"metadata is over {_MAX_METADATA_BYTES} bytes as JSON")
        return self


class Rotation(BaseModel):
    """``POST /admin/keys/{id}/rotate``: how long the old key keeps working (0: not at all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grace_s: float = Field(default=0.0, ge=0, le=30 * 86400)


def _admin_store(request: Request) -> tuple[Services, KeyStore]:
    """The services and the key store, for an admin key on a gateway with a database."""
    services = _services(request)
    principal = services.auth.authenticate(request.headers.get("authorization"))
    if not principal.admin:
        raise PermissionDenied("Managing API keys needs an admin key.")
    if services.database is None:
        raise ServiceUnavailable(
            "Managed API keys need a database: this gateway has no `database` configured."
        )
    return services, KeyStore(services.database)


@contextlib.contextmanager
def _database() -> Iterator[None]:
    """The store's errors as the admin API's answers."""
    try:
        yield
    except UNREACHABLE:
        raise ServiceUnavailable(
            "The key database (PostgreSQL) is not reachable right now; keys already "
            "issued keep working. Try again shortly."
        ) from None
    except key_store.KeyNotFound as exc:
        raise KeyNotFound(f"No API key has the id '{exc}'.", param="id") from None
    except key_store.KeyNotActive as exc:
        raise InvalidRequest(f"Cannot rotate: {exc}.", code="key_not_active") from None


Body = TypeVar("Body", bound=BaseModel)


async def _body(request: Request, model: type[Body], *, required: bool = True) -> Body:
    raw = await request.body()
    if not raw.strip() and not required:
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(format_validation_error(exc, "body"), param=param) from None


def _spec(body: NewKey, services: Services, now: datetime) -> KeySpec:
    """The key to store; 400 for names the config does not know or a time already past."""
    tiers = [tier.name for tier in services.settings.tiers]
    models = services.routes.model_names()
    for field, asked, known in (
        ("allowed_tiers", body.allowed_tiers, tiers),
        ("allowed_models", body.allowed_models, models),
    ):
        unknown = sorted(set(asked or ()) - set(known))
        if unknown:
            raise InvalidRequest(
                f"{field}: {', '.join(unknown)} not in this gateway's config "
                f"(known: {', '.join(known)}).",
                param=field,
            )
    expires_at = body.expires_at
    if body.expires_in_s is not None:
        expires_at = now + timedelta(seconds=body.expires_in_s)
    if expires_at is not None and expires_at <= now:
        raise InvalidRequest("expires_at is in the past.", param="expires_at")
    return KeySpec(
        name=body.name,
        tenant=body.tenant,
        priority=body.priority,
        force_tier=body.force_tier,
        allowed_models=None if body.allowed_models is None else tuple(body.allowed_models),
        allowed_tiers=None if body.allowed_tiers is None else tuple(body.allowed_tiers),
        daily_usd=body.daily_usd,
        monthly_usd=body.monthly_usd,
        requests_per_minute=body.requests_per_minute,
        tokens_per_minute=body.tokens_per_minute,
        expires_at=expires_at,
        metadata=body.metadata,
    )


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _money(amount: Decimal | None) -> str | None:
    return None if amount is None else fmt(amount)


def key_json(key: StoredKey, now: datetime) -> dict[str, Any]:
    """A key as the API shows it: everything but the secret (its last 4 characters)."""
    spec = key.spec
    return {
        "object": "api_key",
        "id": key.id,
        "name": spec.name,
        "tenant": spec.tenant,
        "hint": f"{key_store.SECRET_PREFIX}...{key.hint}",
        "status": key.status(now),
        "priority": spec.priority,
        "force_tier": spec.force_tier,
        "allowed_models": None if spec.allowed_models is None else list(spec.allowed_models),
        "allowed_tiers": None if spec.allowed_tiers is None else list(spec.allowed_tiers),
        "daily_usd": _money(spec.daily_usd),
        "monthly_usd": _money(spec.monthly_usd),
        "requests_per_minute": spec.requests_per_minute,
        "tokens_per_minute": spec.tokens_per_minute,
        "metadata": dict(spec.metadata),
        "created_at": _when(key.created_at),
        "expires_at": _when(spec.expires_at),
        "revoked_at": _when(key.revoked_at),
        "rotated_from": key.rotated_from,
        "updated_at": _when(key.updated_at),
    }


def _flag(value: str | None, param: str) -> bool:
    if value is None or value.lower() in ("false", "0", "no"):
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    raise InvalidRequest(f"'{param}' must be true or false.", param=param)


@router.post("", status_code=201, responses=_RESPONSES)
async def create_key(request: Request) -> Response:
    """A new key. The answer's ``secret`` is the only copy: it is stored as a digest."""
    services, store = _admin_store(request)
    now = datetime.now(UTC)
    spec = _spec(await _body(request, NewKey), services, now)
    with _database():
        key, secret = await store.create(spec)
    services.auth.apply([key])
    return _json({**key_json(key, now), "secret": secret}, 201)


@router.get("", responses=_RESPONSES)
async def list_keys(
    request: Request, tenant: str | None = None, include_revoked: str | None = None
) -> Response:
    """Keys oldest first, every tenant's or one's; revoked ones with ``include_revoked=true``."""
    _, store = _admin_store(request)
    revoked = _flag(include_revoked, "include_revoked")
    with _database():
        keys = await store.list_keys(tenant, include_revoked=revoked)
    now = datetime.now(UTC)
    return _json({"object": "list", "data": [key_json(key, now) for key in keys]})


@router.get("/{key_id}", responses=_RESPONSES)
async def get_key(request: Request, key_id: str) -> Response:
    _, store = _admin_store(request)
    with _database():
        key = await store.get(key_id)
    return _json(key_json(key, datetime.now(UTC)))


@router.delete("/{key_id}", responses=_RESPONSES)
async def revoke_key(request: Request, key_id: str) -> Response:
    """Revoke the key: refused here at once, on every gateway within ``auth.refresh_s``."""
    services, store = _admin_store(request)
    with _database():
        key = await store.revoke(key_id)
    services.auth.apply([key])
    return _json(key_json(key, datetime.now(UTC)))


@router.post("/{key_id}/rotate", status_code=201, responses=_RESPONSES)
async def rotate_key(request: Request, key_id: str) -> Response:
    """A new key like this one (``rotated_from`` its id) and its secret; ``previous`` is the
    old key, revoked, or expiring ``grace_s`` from now."""
    services, store = _admin_store(request)
    rotation = await _body(request, Rotation, required=False)
    with _database():
        key, secret, old = await store.rotate(key_id, rotation.grace_s)
    services.auth.apply([old, key])
    now = datetime.now(UTC)
    return _json({**key_json(key, now), "secret": secret, "previous": key_json(old, now)}, 201)
