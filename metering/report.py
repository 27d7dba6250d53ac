"""One request's metered outcome, and how it is shown: headers and the stream's ``tollway`` object.

Plain data: the gateway fills it in once per request, and every sink reads
the same object: the response headers, Prometheus, the span and the usage
ledger. Dollars are integer nano-dollars (``Cost``), printed with nine
decimals without a Decimal in between; the GPU-seconds' six-decimal spelling
is made once and shared by the header and the ledger (which sums exactly the
microseconds the header printed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from metering.money import NANOS_PER_USD, fmt_nanos, to_nanos
from metering.pricing import Cost
from metering.usage import TokenUsage

HEADER_PREFIX = "x-tollway-"
_H_REQUEST_ID = HEADER_PREFIX + "request-id"
_H_TIER = HEADER_PREFIX + "tier"
_H_MODEL = HEADER_PREFIX + "model"
_H_PROMPT = HEADER_PREFIX + "prompt-tokens"
_H_COMPLETION = HEADER_PREFIX + "completion-tokens"
_H_GPU = HEADER_PREFIX + "gpu-seconds"
_H_COST = HEADER_PREFIX + "cost-usd"
_H_LOADED = HEADER_PREFIX + "cost-loaded-usd"
_H_CACHED = HEADER_PREFIX + "cached-prompt-tokens"
_H_SAVED = HEADER_PREFIX + "cost-saved-usd"
# The figures' names as the ASGI response wants them: encoded once, not per request.
_B_REQUEST_ID, _B_PROMPT, _B_COMPLETION, _B_GPU, _B_COST, _B_LOADED, _B_CACHED, _B_SAVED = (
    name.encode("latin-1")
    for name in (
        _H_REQUEST_ID,
        _H_PROMPT,
        _H_COMPLETION,
        _H_GPU,
        _H_COST,
        _H_LOADED,
        _H_CACHED,
        _H_SAVED,
    )
)


def _nanos_bytes(nanos: int) -> bytes:
    """``fmt_nanos(nanos)`` as header bytes, formatted as bytes directly."""
    if nanos < 0:
        return fmt_nanos(nanos).encode("latin-1")
    return b"%d.%09d" % divmod(nanos, NANOS_PER_USD)


@dataclass(slots=True)
class RequestReport:
    # gateway/meter.py builds this positionally (one call per request): keep the order.

    request_id: str
    tenant: str
    tier: str
    model: str
    operation: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    gpu_seconds: float = 0.0
    cost: Cost = field(default_factory=Cost.free)
    cache: str = "miss"  # miss | hit | bypass | coalesced | replay
    saved: Decimal | None = None  # what a hit or replay would have cost
    replica: str | None = None
    attempts: int = 0
    status: int = 200
    finish_reasons: tuple[str, ...] = ()  # these two only span attributes read: a
    response_id: str | None = None  # non-streamed answer fills them only when traced
    error_type: str | None = None
    _gpu_text: str | None = field(default=None, init=False, repr=False, compare=False)
    _saved_nanos: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def gpu_seconds_text(self) -> str:
        """The GPU-seconds as the header prints them: six decimals."""
        text = self._gpu_text
        if text is None:
            text = self._gpu_text = f"{self.gpu_seconds:.6f}"
        return text

    @property
    def saved_nanos(self) -> int | None:
        if self.saved is None:
            return None
        nanos = self._saved_nanos
        if nanos is None:
            nanos = self._saved_nanos = to_nanos(self.saved)
        return nanos

    def figures(self) -> dict[str, str]:
        """The numbers, by short name: header suffixes and the stream object's keys."""
        n = len(HEADER_PREFIX)
        return {name[n:]: value for name, value in self.headers().items()}

    def headers(self) -> dict[str, str]:
        """Every ``x-tollway-*`` header of the report: tier and model, then ``raw_headers``."""
        out = {_H_TIER: self.tier, _H_MODEL: self.model}
        for name, value in self.raw_headers():
            out[name.decode("latin-1")] = value.decode("latin-1")
        return out

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The figures' headers, encoded for the response (the hot path's form).

        Tier and model are not among them: a routed response carries those
        already (``headers()`` has all of them).
        """
        usage = self.usage
        cost = self.cost
        out = [
            (_B_REQUEST_ID, self.request_id.encode("latin-1")),
            (_B_PROMPT, b"%d" % usage.prompt_tokens),
            (_B_COMPLETION, b"%d" % usage.completion_tokens),
            (_B_GPU, self.gpu_seconds_text.encode("latin-1")),
            (_B_COST, _nanos_bytes(cost.marginal_nanos)),
            (_B_LOADED, _nanos_bytes(cost.loaded_nanos)),
        ]
        if usage.cached_prompt_tokens:
            out.append((_B_CACHED, b"%d" % usage.cached_prompt_tokens))
        if self.saved is not None:
            out.append((_B_SAVED, _nanos_bytes(self.saved_nanos or 0)))
        return out

    def stream_object(self) -> dict[str, Any]:
        """The ``tollway`` object put beside ``usage`` in a stream's final data event."""
        saved = self.saved_nanos
        return {
            "request_id": self.request_id,
            "tier": self.tier,
            "model": self.model,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "cached_prompt_tokens": self.usage.cached_prompt_tokens,
            "gpu_seconds": round(self.gpu_seconds, 6),
            "cost_usd": fmt_nanos(self.cost.marginal_nanos),
            "cost_loaded_usd": fmt_nanos(self.cost.loaded_nanos),
            "cost_saved_usd": None if saved is None else fmt_nanos(saved),
            "cache": self.cache,
        }
