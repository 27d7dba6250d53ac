"""bench/metering/ablate.py: variants as written on its command line, and ratios per round."""

from __future__ import annotations

import pytest

from bench.metering.ablate import Variant, parse_args, parse_variant, relative


def test_a_variant_names_metering_sampling_and_a_path() -> None:
    assert parse_variant("off=off") == Variant("off", False)
    assert parse_variant("on=on") == Variant("on", True)
    assert parse_variant("rare=on,sampling=0.0001,path=/w/t") == Variant(
        "rare", True, 0.0001, "/w/t"
    )
    assert parse_variant("old=off,path=/w/old") == Variant("old", False, None, "/w/old")


@pytest.mark.parametrize(
    "text",
    [
        "on",
        "x=maybe",
        "x=on,sampling=2",
        "x=on,sampling=0",
        "x=off,sampling=0.5",
        "x=on,y=1",
        "=on",
    ],
)
def test_a_malformed_variant_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"want|must|unknown option"):
        parse_variant(text)


def test_ratios_are_per_round_against_the_first_variant() -> None:
    cpu = {"off": [100.0, 200.0, 100.0], "on": [110.0, 240.0, 130.0]}
    result = relative(cpu, "off")
    assert result["off"] == (0.0, [0.0, 0.0, 0.0])
    median, ratios = result["on"]
    assert ratios == pytest.approx([0.1, 0.2, 0.3])
    assert median == pytest.approx(0.2)  # the median of the rounds, not of the sides


def test_two_to_five_distinct_variants(capsys: pytest.CaptureFixture[str]) -> None:
    assert [v.name for v in parse_args(["a=off", "b=on"]).variants] == ["a", "b"]
    for argv in (["a=off"], ["a=off", "a=on"], [f"v{i}=on" for i in range(6)]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert "variants" in capsys.readouterr().err


def test_every_round_starts_new_gateways_unless_told_otherwise() -> None:
    assert parse_args(["a=off", "b=on"]).fresh_every == 1
    assert parse_args(["a=off", "b=on", "--fresh-every", "4"]).fresh_every == 4
    with pytest.raises(SystemExit):
        parse_args(["a=off", "b=on", "--fresh-every", "0"])
