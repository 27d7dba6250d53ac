"""Token usage: vLLM's ``usage`` object read for whole answers and for streams."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.usage import StreamUsage, TokenUsage

DETAILS = st.none() | st.fixed_dictionaries({"cached_tokens": st.integers(0, 10**6)})


@given(prompt=st.integers(0, 10**6), done=st.integers(0, 10**6), details=DETAILS)
def test_counts_and_cached_tokens_are_read(
    prompt: int, done: int, details: dict[str, int] | None
) -> None:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": done,
        "total_tokens": prompt + done,
        "prompt_tokens_details": details,
    }
    got = TokenUsage.from_openai(usage)
    cached = details["cached_tokens"] if details else 0
    assert got == TokenUsage(prompt, done, cached)
    assert got is not None
    assert got.total_tokens == prompt + done


@pytest.mark.parametrize(
    "usage",
    [
        None,
        [],
        "12",
        {},
        {"prompt_tokens": 1},
        {"prompt_tokens": "1", "completion_tokens": 2},  # a string is not a count
        {"prompt_tokens": True, "completion_tokens": 2},  # nor is a boolean
        {"prompt_tokens": 1.0, "completion_tokens": 2},
        {"prompt_tokens": -1, "completion_tokens": 2},  # nor is a negative number
    ],
)
def test_what_is_not_a_usage_object_gives_none(usage: Any) -> None:
    assert TokenUsage.from_openai(usage) is None


def test_odd_details_count_no_cached_tokens() -> None:
    for details in ({"cached_tokens": None}, {"cached_tokens": "3"}, {"cached_tokens": -3}, "x"):
        usage = {"prompt_tokens": 4, "completion_tokens": 5, "prompt_tokens_details": details}
        assert TokenUsage.from_openai(usage) == TokenUsage(4, 5, 0)


def test_a_stream_keeps_the_latest_cumulative_usage() -> None:
    stream = StreamUsage()
    assert stream.latest is None
    stream.observe({"choices": [{"delta": {"content": "a"}}]})  # no usage on this chunk
    assert stream.latest is None
    stream.observe({"usage": {"prompt_tokens": 7, "completion_tokens": 1}})
    stream.observe({"usage": {"prompt_tokens": 7, "completion_tokens": 2}})
    stream.observe({"usage": None})  # a chunk without figures keeps the last ones
    assert stream.latest == TokenUsage(7, 2)
