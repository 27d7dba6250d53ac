"""The complexity score: request features -> a number in (0, 1) plus why.

After RouteLLM's routers (``score(prompt) -> float``, then a threshold):
``ComplexityScorer.score(body)`` normalises each raw feature from
``router.features`` with its YAML ``transform`` and ``scale``
(``linear: min(1, raw/scale)``, ``log: min(1, log1p(raw)/log1p(scale))``),
multiplies by its ``weight`` and passes ``bias + sum`` through a logistic.
Weights must be >= 0, so adding any signal never lowers the score. The
weights live in YAML (``router/weights.yaml`` is the shipped default);
loading validates it strictly: unknown or missing features, bad types and
negative weights fail with the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.features import FEATURES, extract

DEFAULT_WEIGHTS = Path(__file__).with_name("weights.yaml")


class WeightsError(ValueError):
    """The weights file is missing, unparsable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureWeight(_Strict):
    weight: float = Field(ge=0)
    scale: float = Field(gt=0)
    transform: Literal["linear", "log"] = "linear"


class Weights(_Strict):
    version: Literal[1]
    bias: float
    scan_chars: int = Field(default=6000, ge=64)
    features: dict[str, FeatureWeight]


@dataclass(frozen=True, slots=True)
class RouteScore:
    value: float  # in (0, 1); higher = harder = more expensive tier
    contributions: tuple[tuple[str, float], ...]  # (feature, logit units), largest first

    def reason(self, top: int = 3) -> str:
        """The largest contributions, e.g. ``"code=2.10,math=1.33,long_prompt=0.85"``."""
        shown = [f"{name}={value:.2f}" for name, value in self.contributions[:top] if value > 0]
        return ",".join(shown) or "no_signal"


def _format_errors(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()
    )


class ComplexityScorer:
    def __init__(self, weights: Weights):
        names = set(weights.features)
        unknown = sorted(names - set(FEATURES))
        missing = [f for f in FEATURES if f not in names]
        if unknown or missing:
            raise WeightsError(
                f"features: unknown {unknown or 'none'}, missing {missing or 'none'} "
                f"(known: {', '.join(FEATURES)})"
            )
        self.weights = weights
        # Precomputed per feature: (name, weight, divisor, is_log), in FEATURES order.
        self._specs = tuple(
            (
                name,
                spec.weight,
                math.log1p(spec.scale) if spec.transform == "log" else spec.scale,
                spec.transform == "log",
            )
            for name in FEATURES
            for spec in (weights.features[name],)
        )

    @classmethod
    def load(cls, path: Path | None = None) -> ComplexityScorer:
        """Load and validate a weights file; ``None`` = the shipped default."""
        path = path or DEFAULT_WEIGHTS
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise WeightsError(f"{path}: cannot read: {exc}") from exc
        except yaml.YAMLError as exc:
            raise WeightsError(f"{path}: not valid YAML: {exc}") from exc
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: Any, source: str = "weights") -> ComplexityScorer:
        if not isinstance(raw, Mapping):
            raise WeightsError(f"{source}: expected a mapping at the top level")
        try:
            weights = Weights.model_validate(raw)
        except ValidationError as exc:
            raise WeightsError(f"{source}: {_format_errors(exc)}") from None
        try:
            return cls(weights)
        except WeightsError as exc:
            raise WeightsError(f"{source}: {exc}") from None

    def score(self, body: Mapping[str, Any]) -> RouteScore:
        raw = extract(body, self.weights.scan_chars)
        logit = self.weights.bias
        contributions: list[tuple[str, float]] = []
        for name, weight, divisor, is_log in self._specs:
            value = raw[name]
            if value <= 0 or weight == 0:
                continue
            norm = (math.log1p(value) if is_log else value) / divisor
            contribution = weight * (norm if norm < 1.0 else 1.0)
            contributions.append((name, contribution))
            logit += contribution
        contributions.sort(key=lambda item: item[1], reverse=True)
        return RouteScore(1.0 / (1.0 + math.exp(-logit)), tuple(contributions))
