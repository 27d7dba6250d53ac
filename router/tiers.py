"""Which tier a score goes to, and budget-aware shifting of the cut points.

Tiers are listed cheapest first; ``cut_points`` ascend and there is one
fewer than tiers. Tier ``i`` owns scores in ``[cut_{i-1}, cut_i)`` (tier 0
from 0, the last tier up to and including 1): a score equal to a cut point
goes to the more expensive side, like RouteLLM's ``score >= threshold``.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Sequence


def validate_cut_points(tiers: Sequence[str], cut_points: Sequence[float]) -> None:
    """Raise ``ValueError`` unless tiers and cut points fit together."""
    if len(tiers) < 2:
        raise ValueError(f"routing needs at least two tiers, got {len(tiers)}")
    if len(set(tiers)) != len(tiers):
        raise ValueError(f"tier names repeat: {list(tiers)}")
    if len(cut_points) != len(tiers) - 1:
        raise ValueError(
            f"{len(tiers)} tiers need {len(tiers) - 1} cut points, got {len(cut_points)}"
        )
    for cut in cut_points:
        if not 0.0 <= cut <= 1.0:
            raise ValueError(f"cut point {cut} is outside [0, 1]")
    if any(a >= b for a, b in itertools.pairwise(cut_points)):
        raise ValueError(f"cut points must strictly ascend: {list(cut_points)}")


def choose_tier(score: float, tiers: Sequence[str], cut_points: Sequence[float]) -> str:
    """The tier owning ``score``. Assumes validated inputs (see ``validate_cut_points``)."""
    return tiers[bisect_right(cut_points, score)]


def shift_cut_points(
    cut_points: Sequence[float],
    burn_rate_usd_per_h: float,
    target_usd_per_h: float | None,
    max_shift: float = 0.2,
) -> list[float]:
    """Raise the cut points (more traffic to cheaper tiers) when over budget.

    With ``overshoot = (burn - target) / target``, ``shift = max_shift *
    min(1, overshoot)``: 10% over target moves a tenth of ``max_shift``,
    double the target or more moves all of it. Each cut point moves that
    fraction of its distance to 1 (``c + shift * (1 - c)``), which keeps them
    ascending and inside [0, 1]. At or under target, or with no target, they
    come back unchanged.
    """
    if not 0.0 <= max_shift <= 1.0:
        raise ValueError(f"max_shift must be in [0, 1], got {max_shift}")
    if target_usd_per_h is None or burn_rate_usd_per_h <= target_usd_per_h:
        return list(cut_points)
    if target_usd_per_h <= 0:
        raise ValueError(f"target_usd_per_h must be > 0, got {target_usd_per_h}")
    overshoot = (burn_rate_usd_per_h - target_usd_per_h) / target_usd_per_h
    shift = max_shift * min(1.0, overshoot)
    return [cut + shift * (1.0 - cut) for cut in cut_points]
