"""The route table: concrete names go to their tier, aliases are routed."""

from __future__ import annotations

import pytest

from router.table import RouteTable, UnknownModel

TIERS = {"small": ["s-1", "s-1-alias"], "large": ["l-1"]}


def test_concrete_model_goes_to_its_tier() -> None:
    table = RouteTable(TIERS, ["auto"], "large")
    decision = table.resolve("s-1-alias")
    assert (decision.tier, decision.model, decision.routed) == ("small", "s-1-alias", False)


def test_alias_goes_to_default_tier_first_model() -> None:
    decision = RouteTable(TIERS, ["auto", "fast"], "large").resolve("fast")
    assert (decision.tier, decision.model, decision.routed) == ("large", "l-1", True)


def test_alias_without_default_goes_to_first_tier() -> None:
    assert RouteTable(TIERS, ["auto"]).resolve("auto").tier == "small"


def test_unknown_model() -> None:
    with pytest.raises(UnknownModel):
        RouteTable(TIERS, ["auto"]).resolve("gpt-4")


def test_model_names_lists_models_then_aliases() -> None:
    assert RouteTable(TIERS, ["auto"]).model_names() == ["s-1", "s-1-alias", "l-1", "auto"]
