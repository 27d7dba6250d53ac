"""One request's metered outcome, and how it is shown: headers and the stream's ``tollway`` object.

Plain data: the gateway fills it in, telemetry and the ledger read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from metering.money import fmt
from metering.pricing import Cost
from metering.usage import TokenUsage

HEADER_PREFIX = "x-tollway-"


@dataclass(slots=True)
class RequestReport:
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
    finish_reasons: tuple[str, ...] = ()
    response_id: str | None = None
    error_type: str | None = None

    def figures(self) -> dict[str, str]:
        """The numbers, by short name: header suffixes and the stream object's keys."""
        out = {
            "request-id": self.request_id,
            "tier": self.tier,
            "model": self.model,
            "prompt-tokens": str(self.usage.prompt_tokens),
            "completion-tokens": str(self.usage.completion_tokens),
            "gpu-seconds": f"{self.gpu_seconds:.6f}",
            "cost-usd": fmt(self.cost.marginal),
            "cost-loaded-usd": fmt(self.cost.loaded),
        }
        if self.usage.cached_prompt_tokens:
            out["cached-prompt-tokens"] = str(self.usage.cached_prompt_tokens)
        if self.saved is not None:
            out["cost-saved-usd"] = fmt(self.saved)
        return out

    def headers(self) -> dict[str, str]:
        return {HEADER_PREFIX + name: value for name, value in self.figures().items()}

    def stream_object(self) -> dict[str, Any]:
        """The ``tollway`` object put beside ``usage`` in a stream's final data event."""
        return {
            "request_id": self.request_id,
            "tier": self.tier,
            "model": self.model,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "cached_prompt_tokens": self.usage.cached_prompt_tokens,
            "gpu_seconds": round(self.gpu_seconds, 6),
            "cost_usd": fmt(self.cost.marginal),
            "cost_loaded_usd": fmt(self.cost.loaded),
            "cost_saved_usd": None if self.saved is None else fmt(self.saved),
            "cache": self.cache,
        }
