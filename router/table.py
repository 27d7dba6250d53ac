"""The route table: which tier serves a requested model name.

Pure data and functions, no I/O. A concrete model name belongs to exactly
one tier. A routed alias (``auto`` and any configured in ``routing.aliases``)
is resolved to a tier's model; until complexity scoring lands, aliases go to
``default_tier`` (or the first, cheapest-listed tier) and the decision says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Decision:
    tier: str
    model: str  # the name forwarded upstream: one the tier's replicas serve
    routed: bool  # True when the client sent an alias and the gateway chose
    reason: str


class UnknownModel(LookupError):
    pass


class RouteTable:
    def __init__(
        self,
        tiers: Mapping[str, Sequence[str]],
        aliases: Sequence[str],
        default_tier: str | None = None,
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

    def resolve(self, model: str) -> Decision:
        decision = self._fixed.get(model) or self._aliases.get(model)
        if decision is None:
            raise UnknownModel(model)
        return decision

    def model_names(self) -> list[str]:
        """Every name a client may send: tier models first, then routed aliases."""
        return [*self._fixed, *self._aliases]
