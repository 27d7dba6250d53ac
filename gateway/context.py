"""``RequestContext``: one request's state, from its head to its settlement.

The pipeline fills it in as the request goes (who asked, where it was
routed, the GPU time its attempts held, what the answer said) and records
the outcome on it (``answered``, ``failed``). ``gateway.settle`` reads it once
at the end: everything a report, a span, a budget and a ledger row need is
here, whichever branch served the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from starlette.types import Receive

from gateway.admission import Ticket
from gateway.errors import GatewayError
from gateway.schemas import Endpoint
from gateway.upstream import GpuBill
from metering.budget import Budget, Held
from metering.report import RequestReport
from metering.telemetry import Content, RequestSpan
from metering.usage import TokenUsage
from router.table import Decision

log = logging.getLogger("tollway.context")

AfterAnswer = Callable[[], Awaitable[object]]


@dataclass(eq=False, slots=True)
class RequestContext:
    request_id: str
    endpoint: Endpoint
    receive: Receive  # the ASGI channel: where a client that left is noticed
    started: float = field(default_factory=time.monotonic)
    # Set while preparing: a request refused before it is routed did no work.
    tenant: str = ""
    key_id: str = ""  # the API key's id (never the key): the ledger's key column
    allowed_tiers: frozenset[str] | None = None  # the key's; None: any (fallbacks too)
    key_budget: Budget | None = None  # a managed key's own budget
    hold_id: str = ""  # its hold in Redis, from just before the admission call
    hold: Held | None = None  # what it holds against its budgets, once admitted
    key_rates: tuple[int | None, int | None] = (None, None)  # the key's requests, tokens/min
    max_tokens: int | None = None  # the most output a choice may have, if the client said
    choices: int = 1  # completions asked for: n, times the prompts of a completions request
    decision: Decision | None = None
    span: RequestSpan | None = None
    ticket: Ticket | None = None  # admission: tenant, priority, deadline
    content: Content | None = None  # only when spans record content (opt-in)
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    cache: str = "miss"  # miss | bypass | hit | coalesced | replay
    fallback_from: str | None = None  # the tier routed to, when a fallback tier served it
    # What serving it did and what the answer said.
    bill: GpuBill = field(default_factory=GpuBill)
    usage: TokenUsage | None = None
    saved_nanos: int = 0  # what a free answer (hit, coalesced, replay) would have cost
    finish_reasons: Sequence[str] = ()
    response_id: str | None = None
    first_token_at: float | None = None
    # The outcome: None until the answer (or the error) is known.
    status: int | None = None
    error: GatewayError | None = None
    report: RequestReport | None = None  # priced once, by ``Meter.report``
    settled: bool = False
    # Work that runs once the answer is sent, newest first (store it, let followers in).
    after: list[AfterAnswer] = field(default_factory=list)

    @property
    def started_work(self) -> bool:
        """Whether the request was routed: from then on it is settled with a report (and
        a ledger row); a request refused before is only counted."""
        return self.decision is not None

    def answered(self, status: int = 200) -> None:
        self.status = status

    def failed(self, error: GatewayError) -> None:
        self.status = error.status
        self.error = error

    async def run_after(self) -> None:
        """Run the after-answer work, newest first; one that fails is logged, the rest run."""
        while self.after:
            step = self.after.pop()
            try:
                await step()
            except Exception:  # storing an answer must never lose the settlement
                log.exception("request %s: after-answer step %r failed", self.request_id, step)
