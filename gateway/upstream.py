"""The upstream vLLM client: pooled connections, timeouts and retries.

aiohttp was chosen by measurement (../shared/BACKENDS.md: ~3,700 proxied
requests/s on one core against ~700 for httpx). One ``ClientSession`` with a
keep-alive pool is opened and closed by the app's lifespan.

Retries live here and only here. An attempt is retried, on another available
replica when the tier has one, when it fails before the upstream sent its
status line: connect errors, a dropped connection, a first-byte timeout, or a
502/503/504 status. Once ``send`` returns, a response exists and nothing is
retried; the caller has not yet sent a byte to its client at that point.

Every attempt holds a ``Slot`` from the admission scheduler
(``gateway.admission``): the first is granted before ``send``; a retry asks
for another, ahead of every waiting request. Failures feed the scheduler's
passive outlier ejection.

Timeouts: ``connect_timeout_s`` per TCP connect; ``total_timeout_s`` for the
whole request, body included; for streams ``first_byte_timeout_s`` bounds the
wait for the status line and any later stall between events. vLLM answers a
non-streaming request only when generation ends, so those are bounded by the
total alone, and a timed-out non-streaming attempt is not retried: its budget
is spent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

from gateway.admission import Scheduler, Slot, Ticket
from gateway.config import UpstreamConfig
from gateway.errors import UpstreamError
from gateway.pool import ReplicaState
from gateway.upstream_errors import failure, outcome
from metering.telemetry import INERT, RequestSpan, Step

log = logging.getLogger("tollway.upstream")

RETRYABLE_STATUS = frozenset({502, 503, 504})


@dataclass(eq=False)
class GpuBill:
    """GPU-seconds a request occupied, over all its attempts (failed retries cost too),
    and the replica of the last attempt (whose price they are charged at)."""

    gpu_seconds: float = 0.0
    attempts: int = 0
    replica: ReplicaState | None = None


@dataclass(eq=False)
class UpstreamReply:
    """A response whose status line has arrived; the body is still to be read."""

    slot: Slot
    response: aiohttp.ClientResponse
    bill: GpuBill
    step: Step
    scheduler: Scheduler
    _released: bool = False
    replica: ReplicaState = field(init=False)  # the slot's, as a field: read on every request

    def __post_init__(self) -> None:
        self.replica = self.slot.replica

    @property
    def status(self) -> int:
        return self.response.status

    async def read(self) -> bytes:
        """The whole body (aiohttp holds it to the request's total deadline)."""
        try:
            return await self.response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc, self.replica.url, during="answering") from None
        finally:
            self.release()

    def release(self, *, abort: bool = False) -> None:
        """Give the slot back; ``abort`` drops the connection so vLLM stops generating."""
        if self._released:
            return
        self._released = True
        self.bill.gpu_seconds += self.scheduler.release(self.slot)
        self.step.end("aborted" if abort else None)
        if abort:
            self.response.close()
        else:
            self.response.release()


class UpstreamClient:
    def __init__(
        self,
        config: UpstreamConfig,
        scheduler: Scheduler,
        on_attempt: Callable[[str, str, str], None] = lambda tier, replica, outcome: None,
    ):
        self.config = config
        self.scheduler = scheduler
        self.on_attempt = on_attempt  # (tier, replica url, outcome): for metrics
        self._session: aiohttp.ClientSession | None = None
        # First attempts (nearly all requests) share prebuilt timeouts.
        self._first_timeouts = {
            stream: self._timeout(stream, time.monotonic() + config.total_timeout_s)
            for stream in (False, True)
        }

    def _timeout(self, stream: bool, deadline: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=max(0.001, deadline - time.monotonic()),
            sock_connect=self.config.connect_timeout_s,
            sock_read=self.config.first_byte_timeout_s if stream else None,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self.config.pool_size_per_replica,
            keepalive_timeout=60,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        return self._session

    async def send(
        self,
        slot: Slot,
        ticket: Ticket,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        stream: bool,
        bill: GpuBill,
        trace: RequestSpan | None = None,
    ) -> UpstreamReply:
        """POST ``body`` to ``slot``'s replica, retrying failures before the status line.

        Retries take new slots in the same tier. Every attempt's occupancy of its
        replica is added to ``bill``; the returned reply holds the last slot.
        """
        config = self.config
        scheduler = self.scheduler
        pool = slot.pool
        deadline = time.monotonic() + config.total_timeout_s
        tried: list[ReplicaState] = []
        reason = ""
        next_slot: Slot | None = slot
        for attempt in range(1, config.max_attempts + 1):
            if next_slot is None:
                now = time.monotonic()
                if all(r in tried or not r.available(now) for r in pool.replicas):
                    backoff = min(0.05 * 2 ** (attempt - 2), 1.0)  # only tried ones are left
                    await asyncio.sleep(backoff * random.uniform(0.5, 1))
                excluded = frozenset(map(id, tried))
                next_slot = await scheduler.retry(pool, ticket, excluded)
            current, next_slot = next_slot, None
            replica = current.replica
            tried.append(replica)
            # aiohttp enforces ``total`` over the whole exchange, body included;
            # for streams ``sock_read`` bounds the wait for the first byte and
            # any later stall between events.
            timeout = (
                self._first_timeouts[stream] if attempt == 1 else self._timeout(stream, deadline)
            )
            bill.attempts += 1
            bill.replica = replica
            step = trace.upstream(replica.url + path, attempt=attempt - 1) if trace else INERT
            sent_headers = dict(headers)
            step.inject_headers(sent_headers)  # W3C traceparent naming this attempt's span
            error: Exception | None = None
            try:
                response = await self.session.post(
                    replica.url + path, data=body, headers=sent_headers, timeout=timeout
                )
            except BaseException as exc:
                bill.gpu_seconds += scheduler.release(current)
                step.end("cancelled" if not isinstance(exc, Exception) else outcome(exc))
                if not isinstance(exc, Exception):
                    raise  # cancelled: the client left
                error = exc
            if error is not None:
                kind = outcome(error)
                self.on_attempt(pool.name, replica.url, kind)
                if kind == "error":
                    raise error  # not an upstream failure: a bug
                last = failure(error, replica.url, during="connecting")
                reason = last.message
                scheduler.failed(replica, reason, at_once=kind == "connect_error")
                if kind == "timeout" and not (stream and time.monotonic() < deadline):
                    raise last from None  # a whole answer's time is spent: not retried
                continue
            step.set_status_code(response.status)
            reply = UpstreamReply(current, response, bill, step, scheduler)
            self.on_attempt(
                pool.name,
                replica.url,
                "ok" if response.status < 500 else f"status_{response.status}",
            )
            if response.status in RETRYABLE_STATUS and attempt < config.max_attempts:
                reason = f"{replica.url} answered {response.status}."
                reply.release()
                scheduler.failed(replica, reason)
                continue
            if response.status < 500:
                scheduler.succeeded(replica)
            return reply
        log.warning("tier %s: giving up after %d attempts: %s", pool.name, len(tried), reason)
        raise UpstreamError(
            f"The upstream for tier '{pool.name}' failed after {len(tried)} attempt(s): {reason}"
        )
