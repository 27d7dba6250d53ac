"""The response cache: whole completions in Redis, found by their request's digest.

Key schema (``P`` is the prefix, default ``tollway``)::

    P:cache:{<digest>}   string, with a TTL: one stored answer

``<digest>`` is ``cache.cache_key.cache_digest`` (64 hex characters, the
tenant inside it). It is the key's hash tag, so the request's in-flight
lock ``P:flight:{<digest>}`` (coalescing) lives in the same cluster slot.

The value is one format byte (``ENTRY_FORMAT``) and the zlib-compressed
orjson of the entry: the completion as the client got it (streams are stored
as the completion they add up to, see ``gateway.sse``), when it was stored,
what it cost and its tokens. The gateway writes it; nothing a client sends
is stored except through a completion it caused, under its own tenant's digest.

Only complete answers are stored (``storable``): every choice finished
because it was done (``stop``, ``tool_calls``...) or hit its length limit.

Every Redis call goes through ``RedisClient.call``: when Redis is down or
slow a lookup is a miss and a store is skipped, counted by the client.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from redis.asyncio import Redis

from cache.redis_client import RedisClient

log = logging.getLogger("tollway.cache")

ENTRY_FORMAT = b"\x01"
COMPRESS_LEVEL = 1  # twice as fast as zlib's default for ~10% more bytes; completions are text
STORABLE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "function_call"})
"""A choice that ended for one of these reasons is complete: the model was done, or
ran into ``max_tokens``. Anything else (vLLM's ``abort`` and ``error``, none at
all, ``content_filter``) is never stored."""

_HEX = frozenset("0123456789abcdef")


class CorruptEntry(ValueError):
    """A stored value that is not a readable entry (another format, or damaged)."""


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """One stored answer and what producing it cost."""

    completion: dict[str, Any]
    stored_at: float  # epoch seconds
    endpoint: str  # "chat.completions" | "completions"
    cost_usd: Decimal  # the original request's marginal cost: what a hit saves
    cost_loaded_usd: Decimal
    prompt_tokens: int
    completion_tokens: int

    def age_s(self, now: float) -> int:
        """Whole seconds since it was stored: the ``Age`` header (never negative)."""
        return max(0, int(now - self.stored_at))

    def encode(self) -> bytes:
        document = {
            "completion": self.completion,
            "stored_at": self.stored_at,
            "endpoint": self.endpoint,
            "cost_usd": str(self.cost_usd),
            "cost_loaded_usd": str(self.cost_loaded_usd),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        return ENTRY_FORMAT + zlib.compress(orjson.dumps(document), COMPRESS_LEVEL)

    @classmethod
    def decode(cls, data: bytes) -> CachedResponse:
        """The entry stored as ``data``; raises ``CorruptEntry`` for anything else."""
        if not data.startswith(ENTRY_FORMAT):
            raise CorruptEntry("not a tollway cache entry of a known format")
        try:
            document = orjson.loads(zlib.decompress(data[len(ENTRY_FORMAT) :]))
            entry = cls(
                document["completion"],
                float(document["stored_at"]),
                str(document["endpoint"]),
                Decimal(document["cost_usd"]),
                Decimal(document["cost_loaded_usd"]),
                int(document["prompt_tokens"]),
                int(document["completion_tokens"]),
            )
        except (zlib.error, ValueError, ArithmeticError, LookupError, TypeError) as exc:
            # ValueError: orjson.JSONDecodeError, float(), int(); ArithmeticError: Decimal().
            raise CorruptEntry(f"corrupt cache entry: {exc}") from exc
        if not isinstance(entry.completion, dict):
            raise CorruptEntry("corrupt cache entry: the completion is not an object")
        return entry


def storable(completion: Mapping[str, Any]) -> bool:
    """A complete answer: at least one choice, and every choice finished normally."""
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(
        isinstance(choice, dict) and choice.get("finish_reason") in STORABLE_FINISH_REASONS
        for choice in choices
    )


class ResponseCache:
    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "tollway",
        default_ttl_s: int = 3600,
        max_entry_bytes: int = 1_000_000,
        put_budget_s: float | None = None,
    ) -> None:
        """``max_entry_bytes`` bounds the stored (compressed) value; ``put_budget_s``
        overrides the client's per-call budget for stores, which run off the
        request path and carry more bytes than a lookup."""
        if default_ttl_s < 1:
            raise ValueError("default_ttl_s must be at least 1")
        self.redis = redis
        self.prefix = prefix
        self.default_ttl_s = default_ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.put_budget_s = put_budget_s

    storable = staticmethod(storable)

    def key(self, digest: str) -> str:
        if len(digest) != 64 or not _HEX.issuperset(digest):
            raise ValueError(f"not a cache digest (64 lowercase hex characters): {digest!r}")
        return f"{self.prefix}:cache:{{{digest}}}"

    async def get(self, digest: str, *, max_age_s: int | None, now: float) -> CachedResponse | None:
        """The stored answer; None if absent, older than ``max_age_s``, unreadable or Redis fails.

        ``now`` is epoch seconds (``time.time()``); the age compared is the one
        the ``Age`` header shows, so ``max-age=5`` accepts ``Age: 5``.
        """
        key = self.key(digest)

        async def read(redis: Redis) -> bytes | None:
            data = await redis.get(key)
            return data if isinstance(data, bytes) else None  # the pool does not decode

        data = await self.redis.call("cache.get", read, None)
        if data is None:
            return None
        try:
            entry = CachedResponse.decode(data)
        except CorruptEntry as exc:
            log.warning("cache entry %s is unreadable, treated as a miss: %s", key, exc)
            return None
        if max_age_s is not None and entry.age_s(now) > max_age_s:
            return None
        return entry

    async def put(self, digest: str, response: CachedResponse, *, ttl_s: int | None) -> bool:
        """Store ``response`` for ``ttl_s`` seconds (None: the default); True if Redis has it.

        Not stored (False): an incomplete answer (see ``storable``), one over
        ``max_entry_bytes`` once compressed, or Redis failing.
        """
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl < 1:
            raise ValueError(f"cache TTL must be at least 1 s, got {ttl}")
        key = self.key(digest)
        if not storable(response.completion):
            return False
        data = response.encode()
        if len(data) > self.max_entry_bytes:
            log.debug("not caching %s: %d bytes > %d", key, len(data), self.max_entry_bytes)
            return False

        async def write(redis: Redis) -> bool:
            return bool(await redis.set(key, data, ex=ttl))

        return await self.redis.call("cache.put", write, False, budget_s=self.put_budget_s)
