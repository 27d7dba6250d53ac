"""The cache key: the same request gives the same key, anything that changes the output does not."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.cache_key import IGNORED_FIELDS, cache_digest, is_deterministic

BODY: dict[str, Any] = {
    "model": "auto",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
    ],
    "temperature": 0,
    "max_tokens": 16,
}


def digest(body: dict[str, Any], tenant: str = "acme", model: str = "llama-8b") -> str:
    return cache_digest(tenant, model, "chat.completions", body)


def test_a_digest_is_64_hex_characters() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", digest(BODY))


def test_the_same_request_in_another_key_order_has_the_same_digest() -> None:
    reordered = dict(reversed(list(BODY.items())))
    reordered["messages"] = [dict(reversed(list(m.items()))) for m in BODY["messages"]]
    assert digest(reordered) == digest(BODY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", True),
        ("stream_options", {"include_usage": True, "continuous_usage_stats": True}),
        ("user", "end-user-42"),
        ("safety_identifier", "hash-of-user"),
        ("metadata", {"feature": "search"}),
        ("store", True),
        ("request_id", "req-123"),
        ("service_tier", "flex"),
        ("priority", 10),
        ("prompt_cache_key", "tenant-prefix"),
        ("prompt_cache_options", {"mode": "explicit"}),
        ("prompt_cache_retention", "24h"),
        ("model", "llama-8b"),
    ],
)
def test_fields_that_do_not_change_the_output_are_left_out(field: str, value: Any) -> None:
    assert field in IGNORED_FIELDS
    assert digest({**BODY, field: value}) == digest(BODY)


def test_the_list_of_ignored_fields_is_exactly_the_documented_one() -> None:
    documented = {
        "stream", "stream_options", "model", "user", "safety_identifier", "metadata",
        "store", "request_id", "service_tier", "priority", "prompt_cache_key",
        "prompt_cache_options", "prompt_cache_retention",
    }  # fmt: skip
    assert documented == IGNORED_FIELDS


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"temperature": 0.0},  # hashed as sent: 0 and 0.0 are two keys (no normalising)
        {"messages": [{"role": "user", "content": "Name a prime!"}]},
        {"max_tokens": 17},
        {"seed": 1},
        {"n": 2},
        {"stop": ["\n"]},
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"top_k": 5},  # vLLM's extra sampling parameters are kept
        {"repetition_penalty": 1.1},
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"cache_salt": "s1"},
        {"some_future_param": 1},  # unknown fields count
        {"temperature": None},  # null is not absent: kept as sent
    ],
)
def test_fields_that_change_the_output_change_the_digest(change: dict[str, Any]) -> None:
    assert digest({**BODY, **change}) != digest(BODY)


def test_tenant_model_and_endpoint_each_change_the_digest() -> None:
    base = digest(BODY)
    assert digest(BODY, tenant="globex") != base
    assert digest(BODY, model="llama-70b") != base
    assert cache_digest("acme", "llama-8b", "completions", BODY) != base


def test_a_body_naming_another_tenant_cannot_produce_its_digest() -> None:
    victim = digest(BODY, tenant="acme")
    forged = {**BODY, "tenant": "acme", "model": "llama-8b", "endpoint": "chat.completions"}
    assert digest(forged, tenant="globex") != victim
    # Quoting keeps tenant names from bleeding into each other.
    assert digest(BODY, tenant='acme", "x') != digest(BODY, tenant="acme")


@given(
    tenants=st.lists(st.text(max_size=8), min_size=2, max_size=2, unique=True),
    bodies=st.lists(
        st.dictionaries(
            st.text(max_size=6), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=6), max_size=4
        ),
        min_size=2,
        max_size=2,
    ),
)
def test_two_tenants_never_share_a_digest(tenants: list[str], bodies: list[dict[str, Any]]) -> None:
    a, b = tenants
    assert digest(bodies[0], tenant=a) != digest(bodies[1], tenant=b)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, False),  # OpenAI's default temperature is 1
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.0001}, False),
        ({"temperature": 1}, False),
        ({"temperature": False}, False),  # not a number
        ({"temperature": "0"}, False),
        ({"temperature": None}, False),
        ({"seed": 7}, True),
        ({"seed": 0}, True),
        ({"seed": 7, "temperature": 1.2}, True),
        ({"seed": None}, False),
        ({"seed": True}, False),
        ({"temperature": 0, "n": 2}, True),
        ({"temperature": 0.8, "n": 2}, False),
    ],
)
def test_deterministic_means_temperature_zero_or_a_seed(
    body: dict[str, Any], expected: bool
) -> None:
    assert is_deterministic(body) is expected
