"""One request's metered outcome, and how it is shown: headers and the stream's ``tollway`` object.

Plain data: the gateway fills it in once per request, and every sink reads
the same object: the response headers, Prometheus, the span and the usage
ledger. Every figure is an integer: tokens, GPU time in micro-GPU-seconds
(``gpu_us``, what the header's six decimals print) and dollars in nano-dollars
(``Cost``, the nine decimals), so headers, Prometheus and the ledger all sum
exactly what was printed.

Text fields must not hold tabs (the ledger's separator): the gateway's names
come from the validated configuration and request ids from
``gateway.request_id``; the ledger checks each batch anyway.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NamedTuple

from metering.money import fmt_nanos, from_nanos
from metering.pricing import MICROS_PER_SECOND, NO_COST, Cost
from metering.usage import NO_USAGE, TokenUsage

MICROS = MICROS_PER_SECOND  # gpu_us per GPU-second
FREE = frozenset({"hit", "coalesced", "replay"})  # cache statuses served without the model

HEADER_PREFIX = "x-tollway-"


def fmt_micros(micros: int) -> str:
    """Whole micro-units with six decimals: the ``x-tollway-gpu-seconds`` spelling."""
    whole, frac = divmod(micros, MICROS)
    return f"{whole}.{frac:06d}"


def to_micros(seconds: float) -> int:
    """Whole micro-units of ``seconds``, rounded; 0 for NaN or an infinity (never raises)."""
    try:
        return round(seconds * MICROS)
    except (ValueError, OverflowError):  # NaN, inf: a bug upstream must not fail a request
        return 0


class RequestReport(NamedTuple):
    request_id: str
    tenant: str
    tier: str
    model: str
    operation: str
    usage: TokenUsage = NO_USAGE
    gpu_us: int = 0  # micro-GPU-seconds, every attempt's share
    cost: Cost = NO_COST
    cache: str = "miss"  # miss | hit | bypass | coalesced | replay
    saved_nanos: int = 0  # what a free answer (``cache`` in FREE) would have cost
    replica: str = ""  # the last attempt's vLLM replica; "" when none was reached
    attempts: int = 0
    status: int = 200
    finished_us: int = 0  # Unix time in whole micro-seconds
    duration_s: float = 0.0  # arrival to last byte
    ttft_s: float | None = None  # arrival to first token (streams)
    finish_reasons: tuple[str, ...] = ()  # these two only span attributes read: a
    response_id: str | None = None  # non-streamed answer fills them only when traced
    error_type: str | None = None
    # The ledger's: who (the key's id, never the key) and how it was routed.
    key_id: str = ""
    route_score: float | None = None  # the complexity score, when one decided the tier
    fallback_from: str | None = None  # the tier first chosen, when a fallback served it
    # Its budget and rate-limit hold in Redis (gateway.budgets), let go when the report
    # is counted; "" when it took none.
    hold_id: str = ""

    @property
    def gpu_seconds(self) -> float:
        return self.gpu_us / MICROS

    @property
    def free(self) -> bool:
        """Served without running the model: a cache hit, a coalesced answer, a replay."""
        return self.cache in FREE

    @property
    def saved(self) -> Decimal | None:
        """What a free answer would have cost (None for any other)."""
        return from_nanos(self.saved_nanos) if self.cache in FREE else None

    def headers(self) -> dict[str, str]:
        """Every ``x-tollway-*`` figure of the report, as the response's headers spell them."""
        usage = self.usage
        out = {
            HEADER_PREFIX + "tier": self.tier,
            HEADER_PREFIX + "model": self.model,
            HEADER_PREFIX + "request-id": self.request_id,
            HEADER_PREFIX + "prompt-tokens": str(usage.prompt_tokens),
            HEADER_PREFIX + "completion-tokens": str(usage.completion_tokens),
            HEADER_PREFIX + "gpu-seconds": fmt_micros(self.gpu_us),
            HEADER_PREFIX + "cost-usd": fmt_nanos(self.cost.marginal_nanos),
            HEADER_PREFIX + "cost-loaded-usd": fmt_nanos(self.cost.loaded_nanos),
        }
        if usage.cached_prompt_tokens:
            out[HEADER_PREFIX + "cached-prompt-tokens"] = str(usage.cached_prompt_tokens)
        if self.cache in FREE:
            out[HEADER_PREFIX + "cost-saved-usd"] = fmt_nanos(self.saved_nanos)
        return out

    def stream_object(self) -> dict[str, Any]:
        """The ``tollway`` object put beside ``usage`` in a stream's final data event."""
        return {
            "request_id": self.request_id,
            "tier": self.tier,
            "model": self.model,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "cached_prompt_tokens": self.usage.cached_prompt_tokens,
            "gpu_seconds": self.gpu_seconds,  # six decimals: whole micro-GPU-seconds
            "cost_usd": fmt_nanos(self.cost.marginal_nanos),
            "cost_loaded_usd": fmt_nanos(self.cost.loaded_nanos),
            "cost_saved_usd": fmt_nanos(self.saved_nanos) if self.cache in FREE else None,
            "cache": self.cache,
        }
