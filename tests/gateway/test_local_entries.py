"""The in-process layer of hot cache entries: bounded, expiring, off when its TTL is 0."""

from __future__ import annotations

import time
from decimal import Decimal

from cache.response_cache import CachedResponse
from gateway.caching import LocalEntries


def entry(text: str) -> CachedResponse:
    completion = {"id": text, "choices": [{"index": 0, "finish_reason": "stop"}]}
    return CachedResponse(completion, time.time(), "chat.completions", Decimal(0), Decimal(0), 1, 1)


def test_entries_expire() -> None:
    local = LocalEntries(10, ttl_s=0.05)
    local.put("a", entry("a"))
    got = local.get("a")
    assert got is not None
    assert got.completion["id"] == "a"
    time.sleep(0.06)
    assert local.get("a") is None


def test_least_recently_used_goes_first() -> None:
    local = LocalEntries(2, ttl_s=60)
    local.put("a", entry("a"))
    local.put("b", entry("b"))
    assert local.get("a") is not None  # a is now the most recent
    local.put("c", entry("c"))
    assert [d for d in "abc" if local.get(d) is not None] == ["a", "c"]


def test_zero_ttl_turns_it_off() -> None:
    local = LocalEntries(10, ttl_s=0)
    local.put("a", entry("a"))
    assert local.get("a") is None
