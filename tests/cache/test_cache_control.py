"""Cache-Control and x-tollway-cache-ttl parsing, and the lookup/store decision."""

from __future__ import annotations

from typing import Any

import pytest

from cache.cache_control import (
    MAX_DELTA_SECONDS,
    TTL_HEADER,
    CacheControl,
    CacheDecision,
    InvalidCacheHeader,
    Policy,
    decide,
    parse_cache_control,
)

MAX_TTL = 86_400


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, CacheControl()),
        ("", CacheControl()),
        ("no-cache", CacheControl(no_cache=True)),
        ("No-Cache", CacheControl(no_cache=True)),
        ("NO-STORE", CacheControl(no_store=True)),
        ("no-cache, no-store", CacheControl(no_cache=True, no_store=True)),
        ("max-age=60", CacheControl(max_age=60)),
        ("MAX-AGE=60", CacheControl(max_age=60)),
        ("max-age = 60", CacheControl(max_age=60)),
        ('max-age="60"', CacheControl(max_age=60)),
        ("max-age=0", CacheControl(max_age=0)),
        ("  no-transform ,max-age=30,  only-if-cached ", CacheControl(max_age=30)),
        ("max-stale=10, min-fresh=5, private", CacheControl()),
        ("max-age=60, max-age=30", CacheControl(max_age=30)),  # the most restrictive
        ("max-age=30, max-age=abc", CacheControl(max_age=30)),
        # A bad max-age is ignored, like an unrecognised directive.
        ("max-age=abc", CacheControl()),
        ("max-age=-5", CacheControl()),
        ("max-age=1.5", CacheControl()),
        ("max-age=", CacheControl()),
        ("max-age", CacheControl()),
        ("max-age=\u0661\u0662", CacheControl()),  # Arabic-Indic digits are not delta-seconds
        ("max-age=99999999999", CacheControl(max_age=MAX_DELTA_SECONDS)),
        ("max-age=" + "9" * 400, CacheControl(max_age=MAX_DELTA_SECONDS)),
        # A comma inside a quoted value does not split directives.
        ('ext="a, no-store", max-age=5', CacheControl(max_age=5)),
        ('ext="a \\" no-store, b", no-cache', CacheControl(no_cache=True)),
        (",,,", CacheControl()),
        ('no-cache="x-foo"', CacheControl(no_cache=True)),
    ],
)
def test_cache_control_directives(header: str | None, expected: CacheControl) -> None:
    assert parse_cache_control(header, max_ttl_s=MAX_TTL) == expected


@pytest.mark.parametrize(
    ("value", "ttl"),
    [("60", 60), (" 60 ", 60), ("1", 1), ("007", 7), ("86400", 86_400), ("86401", MAX_TTL)],
)
def test_ttl_header_in_whole_seconds_capped_at_the_maximum(value: str, ttl: int) -> None:
    assert parse_cache_control(None, value, max_ttl_s=MAX_TTL).ttl_s == ttl


def test_a_huge_ttl_is_capped_not_refused() -> None:
    assert parse_cache_control(None, "9" * 500, max_ttl_s=MAX_TTL).ttl_s == MAX_TTL


@pytest.mark.parametrize("value", ["", " ", "0", "000", "-5", "1.5", "abc", "60s", "+5", "1e3"])
def test_an_invalid_ttl_header_is_refused_naming_the_header(value: str) -> None:
    with pytest.raises(InvalidCacheHeader) as caught:
        parse_cache_control("no-cache", value, max_ttl_s=MAX_TTL)
    assert isinstance(caught.value, ValueError)
    assert caught.value.header == TTL_HEADER
    assert TTL_HEADER in str(caught.value)


def test_controls_are_frozen() -> None:
    control = parse_cache_control("no-cache", "5", max_ttl_s=MAX_TTL)
    assert control == CacheControl(no_cache=True, ttl_s=5)
    with pytest.raises(AttributeError):
        control.no_cache = False  # type: ignore[misc]


DET: dict[str, Any] = {"temperature": 0}
SAMPLED: dict[str, Any] = {"temperature": 0.7}
NONE = CacheControl()
NO_CACHE = CacheControl(no_cache=True)
NO_STORE = CacheControl(no_store=True)
BOTH = CacheControl(no_cache=True, no_store=True)


@pytest.mark.parametrize(
    ("policy", "body", "control", "expected"),
    [
        ("deterministic", DET, NONE, CacheDecision(True, True, "cacheable")),
        ("deterministic", {"seed": 3}, NONE, CacheDecision(True, True, "cacheable")),
        ("deterministic", SAMPLED, NONE, CacheDecision(False, False, "not_deterministic")),
        ("deterministic", {}, NONE, CacheDecision(False, False, "not_deterministic")),
        ("deterministic", SAMPLED, NO_CACHE, CacheDecision(False, False, "not_deterministic")),
        ("deterministic", DET, NO_CACHE, CacheDecision(False, True, "no_cache")),
        ("deterministic", DET, NO_STORE, CacheDecision(False, False, "no_store")),
        ("deterministic", DET, BOTH, CacheDecision(False, False, "no_store")),
        ("always", SAMPLED, NONE, CacheDecision(True, True, "cacheable")),
        ("always", {}, NO_CACHE, CacheDecision(False, True, "no_cache")),
        ("always", SAMPLED, NO_STORE, CacheDecision(False, False, "no_store")),
        ("always", DET, CacheControl(max_age=5), CacheDecision(True, True, "cacheable")),
        ("never", DET, NONE, CacheDecision(False, False, "policy_never")),
        ("never", SAMPLED, NO_CACHE, CacheDecision(False, False, "policy_never")),
    ],
)
def test_decide(
    policy: Policy, body: dict[str, Any], control: CacheControl, expected: CacheDecision
) -> None:
    decision = decide(policy, body, control)
    assert decision == expected
    assert decision.bypass is (not expected.lookup)
