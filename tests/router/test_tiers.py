"""Tier choice at the boundaries, validation and budget shifting."""

from __future__ import annotations

import pytest

from router.tiers import choose_tier, shift_cut_points, validate_cut_points


def test_two_tiers_boundary_goes_up() -> None:
    tiers = ["small", "large"]
    assert choose_tier(0.0, tiers, [0.3]) == "small"
    assert choose_tier(0.2999, tiers, [0.3]) == "small"
    assert choose_tier(0.3, tiers, [0.3]) == "large"
    assert choose_tier(1.0, tiers, [0.3]) == "large"


def test_three_tiers() -> None:
    tiers, cuts = ["s", "m", "l"], [0.2, 0.6]
    got = [choose_tier(x, tiers, cuts) for x in (0.0, 0.19, 0.2, 0.59, 0.6, 1.0)]
    assert got == ["s", "s", "m", "m", "l", "l"]


@pytest.mark.parametrize(
    ("tiers", "cuts", "message"),
    [
        (["a"], [], "at least two"),
        (["a", "a"], [0.5], "repeat"),
        (["a", "b"], [], "need 1 cut points"),
        (["a", "b", "c"], [0.6, 0.2], "ascend"),
        (["a", "b", "c"], [0.5, 0.5], "ascend"),
        (["a", "b"], [1.5], "outside"),
    ],
)
def test_validation(tiers: list[str], cuts: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_cut_points(tiers, cuts)
    validate_cut_points(["a", "b", "c"], [0.2, 0.6])


def test_shift_unchanged_under_target_or_without_one() -> None:
    assert shift_cut_points([0.3, 0.7], 5.0, 10.0) == [0.3, 0.7]
    assert shift_cut_points([0.3, 0.7], 10.0, 10.0) == [0.3, 0.7]
    assert shift_cut_points([0.3], 99.0, None) == [0.3]


def test_shift_proportional_and_capped() -> None:
    # 10% over: shift = 0.2 * 0.1 = 0.02 of the way to 1
    assert shift_cut_points([0.5], 11.0, 10.0) == pytest.approx([0.51])
    # 100% over and beyond: the full max_shift
    assert shift_cut_points([0.5], 20.0, 10.0) == pytest.approx([0.6])
    assert shift_cut_points([0.5], 1000.0, 10.0) == pytest.approx([0.6])
    shifted = shift_cut_points([0.2, 0.9], 30.0, 10.0, max_shift=0.5)
    assert shifted == pytest.approx([0.6, 0.95])
    assert shifted[0] < shifted[1] <= 1.0


def test_shift_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="max_shift"):
        shift_cut_points([0.5], 1.0, 0.5, max_shift=2.0)
    with pytest.raises(ValueError, match="target"):
        shift_cut_points([0.5], 1.0, 0.0)
