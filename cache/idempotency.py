"""Idempotency keys: a retried request gets the first attempt's response, not a second run.

Semantics follow the IETF httpapi ``Idempotency-Key`` draft: a key is scoped
to the tenant, the request is fingerprinted by its canonical JSON body, and

- the first request with a key runs; its final response is stored for
  ``ttl_s`` (default 24 h) and replayed to any retry with the same body;
- a retry that arrives while the first still runs waits for it (on any
  gateway process sharing Redis), up to a bound, then gets ``Conflict``
  (409 with ``Retry-After``);
- the same key with a different body is a ``Mismatch`` (422);
- a first attempt that fails gives the key up (``release``) so a retry can
  run; a gateway that dies mid-request holds it only until its lease
  (``lease_s``, renewed every ``lease_s / 3`` while the request runs) expires.

The flow for one request::

    outcome = await store.begin(tenant, key, fp)
    if isinstance(outcome, Running):
        outcome = await store.wait(tenant, key, fp, timeout_s=...)
    match outcome:
        case Begun(token):      run it, inside ``store.renewer(tenant, key, token)``;
                                then ``complete`` (a final response) or ``release``
        case Replay(stored):    send ``stored`` with ``Idempotent-Replayed: true``
        case Mismatch():        422
        case Conflict(after):   409, ``Retry-After: after``
        case Unprotected():     Redis is unavailable: run it unprotected

Key schema (``P`` is the prefix, default ``tollway``)::

    P:idem:{<h>}   hash, h = sha256(tenant NUL key)[:32] hex, so neither the
                   tenant nor the client's key appears in Redis:
        st    "r" running | "d" done
        fp    the request fingerprint (sha256 hex of the canonical body)
        tok   the running attempt's owner token (absent once done)
        resp  the stored response (``StoredResponse.pack``), once done
    While running the key expires after the lease unless renewed; once done,
    after ``ttl_s``. An expired running record is simply absent, so the next
    ``begin`` or waiter takes it over: no clock is compared anywhere.

Every transition is one Lua call on that one key (cluster-safe), so of many
concurrent attempts exactly one is ``Begun``, and only the owner's token can
complete, renew or release.

Waiting is polling: each poll is the same atomic call as ``begin`` (which
returns the stored response once there is one, or hands the key to the
waiter if the owner released it or its lease lapsed), every ``poll_s``
growing by half up to ``max_poll_s``, with jitter. It costs one small Lua
call per waiter per poll, holds no connection between polls and behaves the
same on Redis Cluster, where pub/sub would need a node-pinned connection per
waiter.

Redis unavailable (down, slow, circuit open): ``begin`` and ``wait`` return
``Unprotected`` and the request runs as if it carried no key; ``complete``,
``release`` and renewal return quietly. Nothing raises into the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from cache.redis_client import RedisClient
from cache.scripts import Script
from cache.singleflight import backoff, jittered, lease_renewer, new_token

log = logging.getLogger("tollway.idempotency")

# Claim the key or report its state: ARGV = fingerprint, token, lease (ms).
# Returns {"begun"} | {"running"} | {"done", resp} | {"mismatch"}.
_BEGIN = Script(
    """
local st, fp = unpack(redis.call('HMGET', KEYS[1], 'st', 'fp'))
if not st then
  redis.call('HSET', KEYS[1], 'st', 'r', 'fp', ARGV[1], 'tok', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'begun'}
end
if fp ~= ARGV[1] then return {'mismatch'} end
if st == 'd' then return {'done', redis.call('HGET', KEYS[1], 'resp')} end
return {'running'}
"""
)

# The owner (ARGV[1]) stores the response (ARGV[2]) for ARGV[3] ms.
_COMPLETE = Script(
    """
local st, tok = unpack(redis.call('HMGET', KEYS[1], 'st', 'tok'))
if st ~= 'r' or tok ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'd', 'resp', ARGV[2])
redis.call('HDEL', KEYS[1], 'tok')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# The owner (ARGV[1]) gives the key up (ARGV[2] = "del") or extends its lease to ARGV[2] ms.
_OWNER = Script(
    """
local st, tok = unpack(redis.call('HMGET', KEYS[1], 'st', 'tok'))
if st ~= 'r' or tok ~= ARGV[1] then return 0 end
if ARGV[2] == 'del' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
)

_FORMAT = 1


def fingerprint(body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON body (keys sorted at every depth)."""
    data = body if isinstance(body, dict) else dict(body)
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A final response as the client got it: ``body`` for JSON, ``events`` for a stream.

    ``events`` is the whole SSE event sequence, each event's bytes as sent
    (``b"data: {...}\\n\\n"``), so a replay streams exactly what was streamed.
    """

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    events: list[bytes] | None = None

    def pack(self) -> bytes:
        """zlib of a JSON head (status, headers, part lengths), a newline, then the raw parts."""
        events = self.events
        head = [
            _FORMAT,
            self.status,
            self.headers,
            None if self.body is None else len(self.body),
            None if events is None else [len(e) for e in events],
        ]
        parts = [orjson.dumps(head), b"\n", self.body or b"", *(events or ())]
        return zlib.compress(b"".join(parts))

    @classmethod
    def unpack(cls, data: bytes) -> StoredResponse:
        raw = zlib.decompress(data)
        newline = raw.index(b"\n")  # orjson escapes newlines inside strings
        version, status, headers, body_len, event_lens = orjson.loads(raw[:newline])
        if version != _FORMAT:
            raise ValueError(f"unknown stored response format {version}")
        at = newline + 1
        body = None
        if body_len is not None:
            body, at = raw[at : at + body_len], at + body_len
        events = None
        if event_lens is not None:
            events = []
            for length in event_lens:
                events.append(raw[at : at + length])
                at += length
        return cls(int(status), dict(headers), body, events)


@dataclass(frozen=True, slots=True)
class Begun:
    """This attempt owns the key: run it, then ``complete`` or ``release`` with ``token``."""

    token: str


@dataclass(frozen=True, slots=True)
class Running:
    """Another attempt with this body is running: ``wait`` for it."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The key's stored response: send it with ``Idempotent-Replayed: true``, at no cost."""

    response: StoredResponse


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used with a different body: 422."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """Still running after the wait bound: 409 with ``Retry-After: retry_after_s``."""

    retry_after_s: int


@dataclass(frozen=True, slots=True)
class Unprotected:
    """Redis is unavailable: the request runs without idempotency."""


Outcome = Begun | Running | Replay | Mismatch | Unprotected


class IdempotencyStore:
    """Idempotency records in Redis, one per (tenant, key)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "tollway",
        ttl_s: float = 86_400.0,
        lease_s: float = 30.0,
        poll_s: float = 0.02,
        max_poll_s: float = 0.25,
        retry_after_s: int = 1,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_poll_s = max(max_poll_s, poll_s)
        self.retry_after_s = retry_after_s

    def record_key(self, tenant: str, key: str) -> str:
        scope = hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:32]
        return f"{self.prefix}:idem:{{{scope}}}"

    async def begin(self, tenant: str, key: str, fingerprint: str) -> Outcome:
        """Claim the key (``Begun``) or learn its state; ``Running`` means: call ``wait``."""
        return await self._begin(self.record_key(tenant, key), fingerprint, "idempotency.begin")

    async def wait(
        self, tenant: str, key: str, fingerprint: str, *, timeout_s: float
    ) -> Begun | Replay | Mismatch | Conflict | Unprotected:
        """Wait for the running attempt: its response, or the key itself if it gave up.

        ``Begun`` means the owner released the key or its lease lapsed and
        this waiter now owns it (exactly one waiter gets it). ``Mismatch``
        means another body took the key over meanwhile. Past ``timeout_s``:
        ``Conflict``.
        """
        record = self.record_key(tenant, key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = self.poll_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return Conflict(self.retry_after_s)
            await asyncio.sleep(min(jittered(delay), remaining))
            delay = backoff(delay, self.max_poll_s)
            outcome = await self._begin(record, fingerprint, "idempotency.wait")
            if not isinstance(outcome, Running):
                return outcome

    async def complete(self, tenant: str, key: str, token: str, stored: StoredResponse) -> bool:
        """Store the final response for ``ttl_s``; False unless ``token`` still owns the key."""
        record = self.record_key(tenant, key)
        packed = stored.pack()

        async def complete(redis: Redis) -> bool:
            return bool(await _COMPLETE(redis, [record], [token, packed, _ms(self.ttl_s)]))

        return await self.redis.call("idempotency.complete", complete, False)

    async def release(self, tenant: str, key: str, token: str) -> bool:
        """Give the key up after a failed attempt, so that a retry (or a waiter) runs."""
        return await self._owner(tenant, key, token, "del", "idempotency.release") is True

    def renewer(
        self, tenant: str, key: str, token: str
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Keep the key while the block runs: extend its lease every ``lease_s / 3``."""

        async def renew() -> bool | None:
            return await self._owner(tenant, key, token, _ms(self.lease_s), "idempotency.renew")

        return lease_renewer(renew, self.lease_s / 3, "an idempotency key")

    async def _owner(
        self, tenant: str, key: str, token: str, action: str | int, operation: str
    ) -> bool | None:
        """True if done, False if ``token`` no longer owns the key, None if Redis failed."""
        record = self.record_key(tenant, key)

        async def owner(redis: Redis) -> bool:
            return bool(await _OWNER(redis, [record], [token, action]))

        return await self.redis.call(operation, owner, None)

    async def _begin(self, record: str, fingerprint: str, operation: str) -> Outcome:
        token = new_token()

        async def begin(redis: Redis) -> list[Any] | None:
            reply: list[Any] = await _BEGIN(
                redis, [record], [fingerprint, token, _ms(self.lease_s)]
            )
            return reply

        reply = await self.redis.call(operation, begin, None)
        if reply is None:
            return Unprotected()
        state = reply[0]
        if state == b"begun":
            return Begun(token)
        if state == b"running":
            return Running()
        if state == b"mismatch":
            return Mismatch()
        try:
            return Replay(StoredResponse.unpack(reply[1]))
        except (zlib.error, ValueError, TypeError):
            # A record this version cannot read (another version wrote it):
            # fail open, like any Redis failure, rather than fail the request.
            log.exception("unreadable idempotency record %s", record)
            return Unprotected()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
