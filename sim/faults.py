"""Fault injection: which request fails, hangs or dies, decided in one place.

`FaultSettings` is the declarative part (CLI flags, `/sim/faults` JSON);
`FaultInjector` holds the current settings and a seeded RNG and answers, once
per completion request, what should go wrong with it.

Rates are probabilities drawn from `random.Random(seed)`, so a run is
reproducible; 1.0 always fires and 0.0 never does (`random()` is in [0, 1)).
Faults are checked in a fixed order: error, then hang, then die-mid-stream.
"""

from __future__ import annotations

import enum
import random
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FaultSettings(BaseModel):
    """The faults in force; every field has a harmless default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of completion requests answered with `error_status` in vLLM's error shape."""

    error_status: int = 500

    added_latency_ms: float = Field(0.0, ge=0.0)
    """Delay before the response (or the error) starts, on every completion request."""

    hang_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of requests accepted and never answered until the client gives up."""

    die_mid_stream_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of requests whose connection is dropped after `die_after_tokens`
    tokens: a stream stops without `[DONE]`, a non-streaming request gets no response."""

    die_after_tokens: int = Field(3, ge=0)

    unhealthy: bool = False
    """Makes `GET /health` answer 503, like vLLM with a dead engine."""

    @field_validator("error_status")
    @classmethod
    def _known_error_status(cls, value: int) -> int:
        if not 400 <= value <= 599:
            raise ValueError("error_status must be a 4xx or 5xx status")
        HTTPStatus(value)  # raises ValueError for codes HTTP does not define
        return value


class Fault(enum.Enum):
    NONE = "none"
    ERROR = "error"
    HANG = "hang"
    DIE = "die"


class FaultInjector:
    """Current fault settings plus the seeded RNG that applies their rates."""

    def __init__(self, settings: FaultSettings, seed: int) -> None:
        self.settings = settings
        self._rng = random.Random(seed)

    def update(self, changes: dict[str, Any]) -> FaultSettings:
        """Merge `changes` into the current settings; raises pydantic.ValidationError."""
        merged = {**self.settings.model_dump(), **changes}
        self.settings = FaultSettings.model_validate(merged)
        return self.settings

    def clear(self) -> FaultSettings:
        """Turn every fault off (the start-up faults are not restored)."""
        self.settings = FaultSettings()
        return self.settings

    def decide(self) -> Fault:
        s = self.settings
        # Skip the RNG entirely when nothing is enabled: the common, fast case.
        if not (s.error_rate or s.hang_rate or s.die_mid_stream_rate):
            return Fault.NONE
        if s.error_rate and self._rng.random() < s.error_rate:
            return Fault.ERROR
        if s.hang_rate and self._rng.random() < s.hang_rate:
            return Fault.HANG
        if s.die_mid_stream_rate and self._rng.random() < s.die_mid_stream_rate:
            return Fault.DIE
        return Fault.NONE
