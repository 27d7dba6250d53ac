"""``Idempotency-Key``: a retried request is answered once, and replayed after.

Semantics of the IETF httpapi idempotency-key draft, per tenant:

- the first request with a key runs; its final answer (status, body and the
  headers that matter; for a stream, every event the client got) is stored
  for ``idempotency.ttl_s``;
- a retry with the same key and body gets that answer replayed, with
  ``Idempotent-Replayed: true`` and zero cost (``x-tollway-cache: replay``);
  a stream is replayed as a stream;
- a retry that arrives while the first still runs waits for it (also across
  gateway processes: the state is in Redis) up to ``idempotency.wait_s``,
  then gets 409 with ``Retry-After``;
- the same key with another body is a 422;
- a first attempt that fails (5xx, 408, 429, upstream unreachable, a stream
  cut mid-way, a client that left) releases the key so a retry can run; a
  gateway that dies holds it only until its lease (renewed while it works)
  lapses.

Redis down: the request runs unprotected (fail open).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import Response

from cache.idempotency import (
    Begun,
    Conflict,
    IdempotencyStore,
    Mismatch,
    Outcome,
    Replay,
    Running,
    StoredResponse,
    Unprotected,
)
from gateway.config import IdempotencyConfig
from gateway.context import RequestContext
from gateway.disconnect import cancel_on_disconnect
from gateway.errors import IdempotencyConflict, IdempotencyMismatch, InvalidRequest
from gateway.sse import chunk_of_event, event
from gateway.streaming import EventStreamResponse

log = logging.getLogger("tollway.idempotency")

HEADER = "idempotency-key"
# Headers of the first answer worth keeping; cost figures are kept to report savings.
KEPT = ("content-type", "x-tollway-tier", "x-tollway-model", "x-tollway-prompt-tokens",
        "x-tollway-completion-tokens", "x-tollway-cost-usd")  # fmt: skip
RELEASE_STATUS = frozenset({408, 429})  # and every 5xx: a retry may succeed


def idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    key = raw.strip().strip('"')  # the draft sends it as a quoted string
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise InvalidRequest(
            "The Idempotency-Key header must be 1 to 255 printable ASCII characters.",
            param=HEADER,
            code="invalid_header",
        )
    return key


class IdempotencyLayer:
    def __init__(self, store: IdempotencyStore, config: IdempotencyConfig):
        self.store = store
        self.config = config

    async def run(
        self,
        ctx: RequestContext,
        key: str,
        fingerprint: str,
        *,
        serve: Callable[[], Awaitable[Response]],
        replay: Callable[[StoredResponse], Response],
    ) -> Response:
        """``serve()`` as the first request with ``key``, or ``replay`` its stored answer;
        raises 409 (still running) or 422 (another body)."""
        outcome: Outcome | Conflict = await self.store.begin(ctx.tenant, key, fingerprint)
        if isinstance(outcome, Running):  # a client that leaves stops waiting at once
            waiting = self.store.wait(ctx.tenant, key, fingerprint, timeout_s=self.config.wait_s)
            outcome = await cancel_on_disconnect(waiting, ctx.receive)
        if isinstance(outcome, Replay):
            return replay(outcome.response)
        if isinstance(outcome, Mismatch):
            raise IdempotencyMismatch(
                "This Idempotency-Key was already used with a different request body.",
                param=HEADER,
            )
        if isinstance(outcome, Conflict):
            raise IdempotencyConflict(
                "A request with this Idempotency-Key is still being processed; retry later.",
                retry_after_s=outcome.retry_after_s,
            )
        if isinstance(outcome, Unprotected):
            return await serve()
        assert isinstance(outcome, Begun)
        return await self._first(ctx, key, outcome.token, serve)

    async def _first(
        self,
        ctx: RequestContext,
        key: str,
        token: str,
        serve: Callable[[], Awaitable[Response]],
    ) -> Response:
        try:
            async with self.store.renewer(ctx.tenant, key, token):
                response = await serve()
        except BaseException:
            await self.store.release(ctx.tenant, key, token)
            raise
        if isinstance(response, EventStreamResponse):
            kept = _kept(response)
            response.events = self._keep_stream(ctx, key, token, response.events, kept)
            return response
        if response.status_code >= 500 or response.status_code in RELEASE_STATUS:
            await self.store.release(ctx.tenant, key, token)
            return response
        stored = StoredResponse(response.status_code, _kept(response), body=bytes(response.body))
        if not await self.store.complete(ctx.tenant, key, token, stored):
            log.warning("idempotency key of tenant %s lost before it was completed", ctx.tenant)
        return response

    async def _keep_stream(
        self,
        ctx: RequestContext,
        key: str,
        token: str,
        inner: AsyncGenerator[bytes, None],
        headers: dict[str, str],
    ) -> AsyncGenerator[bytes, None]:
        """Relay the stream, keep every event, store them if it completed, else release."""
        events: list[bytes] = []
        complete = False
        try:
            async with self.store.renewer(ctx.tenant, key, token):
                async for event in inner:
                    events.append(event)
                    yield event
            report = ctx.report
            complete = report is not None and report.status == 200
        finally:
            await inner.aclose()
            if not complete:
                await self.store.release(ctx.tenant, key, token)
        if ctx.report is not None:  # its tokens and cost, which a replay reports as saved
            figures = ctx.report.headers()
            headers.update({k: v for k, v in figures.items() if k in KEPT})
        stored = StoredResponse(200, headers, events=events)
        if not await self.store.complete(ctx.tenant, key, token, stored):
            log.warning("idempotency key of tenant %s lost before it was completed", ctx.tenant)


def _kept(response: Response) -> dict[str, str]:
    return {name: response.headers[name] for name in KEPT if name in response.headers}


async def replayed_events(
    events: list[bytes], figures: dict[str, object] | None
) -> AsyncGenerator[bytes, None]:
    """The stored events, with the final ``tollway`` object saying what this replay cost;
    with metering off (``figures`` None) without one, whenever the stream was stored."""
    for raw in events:
        chunk = chunk_of_event(raw) if b'"tollway"' in raw else None
        if chunk is not None and (figures is not None or "tollway" in chunk):
            if figures is None:
                del chunk["tollway"]
            else:
                chunk["tollway"] = figures
            raw = event(chunk)
        yield raw
