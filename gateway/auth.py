"""API keys: which tenant a request belongs to, and what its key may use.

Two kinds of key, both looked up by their SHA-256 digest (lookup time does not
depend on how much of a guessed key matches, and no secret is a dict key):

- config keys (``auth.keys``): bootstrap and admin keys; they win on a clash;
- managed keys (``/admin/keys``, stored in PostgreSQL): every gateway holds a
  copy in memory, loaded at start and refreshed every ``auth.refresh_s`` by
  ``gateway.managed_keys.KeySync``, so a request never waits on the database
  and keys keep working while it is down. A managed key is never an admin key.

A refusal is a 401 (OpenAI's ``invalid_api_key``) that says whether the key is
unknown, revoked or expired, and never echoes it. Expiry is checked on every
request against this process's clock, so it needs no poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from gateway.config import AuthConfig
from gateway.errors import AuthenticationFailed
from gateway.managed_keys import KeySync
from ledger.database import Pool
from ledger.key_store import KeyStore, StoredKey, digest


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool
    key_id: str  # a managed key's id; a config key's: its digest's first 12 hex digits
    priority: int | None = None  # admission priority; None: the tier's
    force_tier: bool = False  # may send x-tollway-tier
    allowed_models: frozenset[str] | None = None  # model names it may ask for; None: any
    allowed_tiers: frozenset[str] | None = None  # tiers it may be served by; None: any
    # A managed key's own budgets, enforced by reservations (gateway.budgets) beside
    # its tenant's (``budgets:``).
    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None
    # The key's own rate limits (either kind of key), shared by every gateway beside
    # its tenant's (``rate_limits:``); None: no limit of the key's own.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion
    expires_at: float | None = None  # UNIX time from which the key is refused

    def may_use_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def may_use_tier(self, tier: str) -> bool:
        return self.allowed_tiers is None or tier in self.allowed_tiers


def managed_principal(key: StoredKey) -> Principal:
    spec = key.spec
    return Principal(
        tenant=spec.tenant,
        admin=False,
        key_id=key.id,
        priority=spec.priority,
        force_tier=spec.force_tier,
        allowed_models=None if spec.allowed_models is None else frozenset(spec.allowed_models),
        allowed_tiers=None if spec.allowed_tiers is None else frozenset(spec.allowed_tiers),
        daily_usd=spec.daily_usd,
        monthly_usd=spec.monthly_usd,
        requests_per_minute=spec.requests_per_minute,
        tokens_per_minute=spec.tokens_per_minute,
        expires_at=None if spec.expires_at is None else spec.expires_at.timestamp(),
    )


class Authenticator:
    def __init__(self, config: AuthConfig):
        self.refresh_s = config.refresh_s
        self._config: dict[bytes, Principal] = {}
        for key in config.keys:
            found = digest(key.key)
            if found in self._config:
                raise ValueError(f"API key of tenant {key.tenant!r} is listed twice")
            self._config[found] = Principal(
                tenant=key.tenant,
                admin=key.admin,
                key_id=found.hex()[:12],
                priority=key.priority,
                force_tier=key.force_tier,
                requests_per_minute=key.requests_per_minute,
                tokens_per_minute=key.tokens_per_minute,
            )
        self._managed: dict[bytes, Principal] = {}
        self._revoked: set[bytes] = set()  # to say "revoked" rather than "incorrect"
        self._versions: dict[bytes, datetime] = {}  # each managed key's updated_at, as applied
        self._sync: KeySync | None = None

    async def start(self, database: Pool | None) -> None:
        """Load the managed keys from ``database`` and keep them fresh (none: config keys only)."""
        if database is not None:
            self._sync = KeySync(KeyStore(database), self.refresh_s, self.apply)
            await self._sync.start()

    async def stop(self) -> None:
        if self._sync is not None:
            await self._sync.stop()

    def apply(self, keys: Iterable[StoredKey]) -> None:
        """Take in managed keys as stored, new, changed or revoked: from the poll, and at
        once from this gateway's own admin API."""
        for key in keys:
            if key.digest in self._config:
                continue
            applied = self._versions.get(key.digest)
            if applied is not None and key.updated_at < applied:
                continue  # a poll read the row before this gateway's own change to it
            self._versions[key.digest] = key.updated_at
            if key.revoked_at is None:
                self._managed[key.digest] = managed_principal(key)
                self._revoked.discard(key.digest)
            else:
                self._managed.pop(key.digest, None)
                self._revoked.add(key.digest)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed("Missing API key: send it as 'Authorization: Bearer <key>'.")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        found = digest(secret.strip())
        principal = self._config.get(found) or self._managed.get(found)
        if principal is None:
            if found in self._revoked:
                raise AuthenticationFailed("This API key has been revoked.")
            raise AuthenticationFailed("Incorrect API key provided.")
        if principal.expires_at is not None and time.time() >= principal.expires_at:
            raise AuthenticationFailed("This API key has expired.")
        return principal
