"""The route table: which tier serves a requested model name.

Pure data and functions, no I/O. A concrete model name belongs to exactly
one tier. A routed alias (``auto`` and any configured in ``routing.aliases``)
is resolved to a tier's model: with a ``ComplexityScorer`` and cut points, by
the request's complexity score (tiers cheapest first, each owning a score
range: ``router.tiers.choose_tier``); without them, to ``default_tier`` (or
the first, cheapest-listed tier). The decision says which and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.score import ComplexityScorer
from router.tiers import choose_tier, validate_cut_points


@dataclass(frozen=True, slots=True)
class Decision:
    tier: str
    model: str  # the name forwarded upstream: one the tier's replicas serve
    routed: bool  # True when the client sent an alias and the gateway chose
    reason: str
    score: float | None = None  # the complexity score, when one decided


class UnknownModel(LookupError):
    pass


class RouteTable:
    def __init__(
        self,
        tiers: Mapping[str, Sequence[str]],
        aliases: Sequence[str],
        default_tier: str | None = None,
        *,
        scorer: ComplexityScorer | None = None,
        cut_points: Sequence[float] | None = None,
    ):
        if not tiers:
            raise ValueError("a route table needs at least one tier")
        self._tier_models = {name: list(models) for name, models in tiers.items()}
        self._fixed = {
            model: Decision(tier, model, False, "model served by this tier")
            for tier, models in tiers.items()
            for model in models
        }
        default = default_tier or next(iter(tiers))
        self._aliases = {
            alias: Decision(default, tiers[default][0], True, "default tier for routed alias")
            for alias in aliases
        }

        self._scorer = scorer if cut_points is not None else None
        self._cut_points = list(cut_points or ())
        self._tier_names = list(tiers)
        if self._scorer is not None:
            validate_cut_points(self._tier_names, self._cut_points)

    @property
    def cut_points(self) -> list[float] | None:
        return list(self._cut_points) if self._scorer is not None else None

    def resolve(
        self,
        model: str,
        body: Mapping[str, Any] | None = None,
        cut_points: Sequence[float] | None = None,
    ) -> Decision:
        """The tier for ``model``; an alias with a scorer is scored on ``body``.

        ``cut_points`` overrides the configured ones (budget-aware routing).
        """
        decision = self._fixed.get(model)
        if decision is not None:
            return decision
        decision = self._aliases.get(model)
        if decision is None:
            raise UnknownModel(model)
        if self._scorer is None or body is None:
            return decision
        score = self._scorer.score(body)
        cuts = self._cut_points if cut_points is None else cut_points
        tier = choose_tier(score.value, self._tier_names, cuts)
        return Decision(tier, self._tier_models[tier][0], True, score.reason(), score.value)

    def force(self, model: str, tier: str) -> Decision:
        """``model`` sent to ``tier`` whatever routing would say (``x-tollway-tier``).

        Raises ``UnknownModel`` for a name no tier serves nor routes, ``KeyError``
        for an unknown tier.
        """
        if model not in self._fixed and model not in self._aliases:
            raise UnknownModel(model)
        models = self._tier_models[tier]
        chosen = model if model in models else models[0]
        return Decision(tier, chosen, True, "forced by x-tollway-tier")

    def model_names(self) -> list[str]:
        """Every name a client may send: tier models first, then routed aliases."""
        return [*self._fixed, *self._aliases]
