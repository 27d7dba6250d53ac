"""Managed API keys in PostgreSQL (the ``api_keys`` table): create, list, get, revoke, rotate.

A secret is 256 random bits spelled ``sk-tw-<43 base62 chars>``. ``create``
and ``rotate`` return it once; the table keeps only its SHA-256 digest
(``digest``, what a gateway looks a request's key up by) and its last four
characters (``hint``). Every change moves the row's ``updated_at`` (a trigger
does it), which is how gateways find what changed (``changed_since``).

A key's budgets (``daily_usd``, ``monthly_usd``) and rate limits
(``requests_per_minute``, ``tokens_per_minute``) are enforced by the gateway
(``gateway.budgets``), beside its tenant's.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

SECRET_PREFIX = "sk-tw-"
_ALPHABET = string.digits + string.ascii_letters
_SECRET_CHARS = 43  # 62**43 > 2**256
_ID_CHARS = 16  # about 95 bits: ids never collide in practice


def digest(secret: str) -> bytes:
    """What a key is stored and looked up by: its SHA-256 digest (32 bytes)."""
    return hashlib.sha256(secret.encode()).digest()


def _base62(bits: int, width: int) -> str:
    value = secrets.randbits(bits)
    chars = []
    for _ in range(width):
        value, rest = divmod(value, 62)
        chars.append(_ALPHABET[rest])
    return "".join(chars)


def new_secret() -> str:
    return SECRET_PREFIX + _base62(256, _SECRET_CHARS)


def new_id() -> str:
    return "key_" + _base62(95, _ID_CHARS)


Status = Literal["active", "expired", "revoked"]


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What an admin chooses for a key (a rotation copies it to the new key)."""

    name: str
    tenant: str
    priority: int | None = None  # admission priority, -100..100; None: the tier's
    force_tier: bool = False  # may pick its tier with x-tollway-tier
    allowed_models: tuple[str, ...] | None = None  # None: every model
    allowed_tiers: tuple[str, ...] | None = None  # None: every tier
    daily_usd: Decimal | None = None  # enforced by gateway.budgets
    monthly_usd: Decimal | None = None
    requests_per_minute: int | None = None  # None: no limit of the key's own
    tokens_per_minute: int | None = None  # prompt + completion
    expires_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A row of ``api_keys``: everything about a key but its secret."""

    id: str
    digest: bytes
    hint: str  # the secret's last four characters
    spec: KeySpec
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None = None
    rotated_from: str | None = None

    def status(self, now: datetime) -> Status:
        if self.revoked_at is not None:
            return "revoked"
        if self.spec.expires_at is not None and self.spec.expires_at <= now:
            return "expired"
        return "active"


class KeyNotFound(LookupError):
    """No key has this id."""


class KeyNotActive(Exception):
    """The key is revoked or expired, so it cannot be rotated."""


_COLUMNS = """id, name, tenant, digest, hint, priority, force_tier, allowed_models,
    allowed_tiers, daily_usd, monthly_usd, requests_per_minute, tokens_per_minute,
    metadata::text AS metadata, created_at, expires_at, revoked_at, rotated_from, updated_at"""

_INSERT = f"""
INSERT INTO api_keys (id, name, tenant, digest, hint, priority, force_tier, allowed_models,
    allowed_tiers, daily_usd, monthly_usd, requests_per_minute, tokens_per_minute, metadata,
    expires_at, rotated_from)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb, $15, $16)
RETURNING {_COLUMNS}"""


def _stored(row: asyncpg.Record) -> StoredKey:
    models, tiers = row["allowed_models"], row["allowed_tiers"]
    spec = KeySpec(
        name=row["name"],
        tenant=row["tenant"],
        priority=row["priority"],
        force_tier=row["force_tier"],
        allowed_models=None if models is None else tuple(models),
        allowed_tiers=None if tiers is None else tuple(tiers),
        daily_usd=row["daily_usd"],
        monthly_usd=row["monthly_usd"],
        requests_per_minute=row["requests_per_minute"],
        tokens_per_minute=row["tokens_per_minute"],
        expires_at=row["expires_at"],
        metadata=orjson.loads(row["metadata"]),
    )
    return StoredKey(
        id=row["id"],
        digest=bytes(row["digest"]),
        hint=row["hint"],
        spec=spec,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revoked_at=row["revoked_at"],
        rotated_from=row["rotated_from"],
    )


async def _insert(
    conn: PoolConnectionProxy[asyncpg.Record], spec: KeySpec, rotated_from: str | None
) -> tuple[StoredKey, str]:
    secret = new_secret()
    row = await conn.fetchrow(
        _INSERT,
        new_id(),
        spec.name,
        spec.tenant,
        digest(secret),
        secret[-4:],
        spec.priority,
        spec.force_tier,
        None if spec.allowed_models is None else list(spec.allowed_models),
        None if spec.allowed_tiers is None else list(spec.allowed_tiers),
        spec.daily_usd,
        spec.monthly_usd,
        spec.requests_per_minute,
        spec.tokens_per_minute,
        orjson.dumps(dict(spec.metadata)).decode(),
        spec.expires_at,
        rotated_from,
    )
    assert row is not None
    return _stored(row), secret


class KeyStore:
    """The ``api_keys`` table through a pool. Errors of a database that is down are
    ``ledger.database.UNREACHABLE``; the caller decides what they mean."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def create(self, spec: KeySpec) -> tuple[StoredKey, str]:
        """A new key and its secret: the only time the secret is seen."""
        async with self.pool.acquire() as conn:
            return await _insert(conn, spec, None)

    async def list_keys(
        self, tenant: str | None = None, include_revoked: bool = False
    ) -> list[StoredKey]:
        """Keys oldest first, one tenant's or all; revoked ones only when asked."""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM api_keys WHERE ($1::text IS NULL OR tenant = $1)"
            " AND ($2 OR revoked_at IS NULL) ORDER BY created_at, id",
            tenant,
            include_revoked,
        )
        return [_stored(row) for row in rows]

    async def get(self, key_id: str) -> StoredKey:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        if row is None:
            raise KeyNotFound(key_id)
        return _stored(row)

    async def revoke(self, key_id: str) -> StoredKey:
        """Revoke the key now; a key already revoked keeps its first ``revoked_at``."""
        row = await self.pool.fetchrow(
            f"UPDATE api_keys SET revoked_at = clock_timestamp()"
            f" WHERE id = $1 AND revoked_at IS NULL RETURNING {_COLUMNS}",
            key_id,
        )
        return _stored(row) if row is not None else await self.get(key_id)

    async def rotate(self, key_id: str, grace_s: float = 0.0) -> tuple[StoredKey, str, StoredKey]:
        """A new key with the old one's attributes (``rotated_from`` the old id), its
        secret, and the old key: revoked now, or expiring ``grace_s`` from now (or at
        its own expiry, if sooner) so clients can switch over."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS}, clock_timestamp() AS now FROM api_keys"
                " WHERE id = $1 FOR UPDATE",
                key_id,
            )
            if row is None:
                raise KeyNotFound(key_id)
            old = _stored(row)
            status = old.status(row["now"])
            if status != "active":
                raise KeyNotActive(f"key {key_id} is {status}: create a new key instead")
            new, secret = await _insert(conn, old.spec, old.id)
            if grace_s > 0:
                retired = await conn.fetchrow(
                    "UPDATE api_keys SET expires_at = LEAST(expires_at,"
                    f" clock_timestamp() + make_interval(secs => $2)) WHERE id = $1"
                    f" RETURNING {_COLUMNS}",
                    key_id,
                    grace_s,
                )
            else:
                retired = await conn.fetchrow(
                    "UPDATE api_keys SET revoked_at = clock_timestamp() WHERE id = $1"
                    f" RETURNING {_COLUMNS}",
                    key_id,
                )
            assert retired is not None
        return new, secret, _stored(retired)

    async def changed_since(self, since: datetime | None) -> list[StoredKey]:
        """Every key whose row changed after ``since`` (all keys for None), oldest change first."""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM api_keys WHERE $1::timestamptz IS NULL OR updated_at > $1"
            " ORDER BY updated_at",
            since,
        )
        return [_stored(row) for row in rows]
