"""Token usage: the ``usage`` object read out of a completion's bytes without parsing the rest."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from metering.usage import TokenUsage, usage_in

# Text that looks like the key and its braces, to be found only where it is a key.
PIECES = ['"', "\\", "{", "}", ":", '"usage":', "usage", "a", " "]
TRICKY = st.lists(st.sampled_from(PIECES), max_size=20).map("".join)
DETAILS = st.none() | st.fixed_dictionaries({"cached_tokens": st.integers(0, 10**6)})


def completion(content: str, usage: dict[str, Any] | None, tail: bool) -> dict[str, Any]:
    """A vLLM-shaped chat completion; ``tail``: keys after ``usage``, as vLLM writes them."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "tool_calls": []},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }
    if tail:
        body["prompt_logprobs"] = None
        body["kv_transfer_params"] = {"a": {"b": 1}}
    return body


@given(
    content=TRICKY,
    prompt=st.integers(0, 10**6),
    done=st.integers(0, 10**6),
    details=DETAILS,
    tail=st.booleans(),
)
def test_usage_in_reads_what_a_full_parse_reads(
    content: str, prompt: int, done: int, details: dict[str, int] | None, tail: bool
) -> None:
    usage = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + done,
        "completion_tokens": done,
        "prompt_tokens_details": details,
    }
    body = orjson.dumps(completion(content, usage, tail))
    expected = TokenUsage.from_openai(orjson.loads(body)["usage"])
    assert usage_in(body) == expected
    assert expected is not None
    assert expected.cached_prompt_tokens == (details or {}).get("cached_tokens", 0)


@given(content=TRICKY)
def test_usage_in_finds_nothing_where_a_full_parse_finds_nothing(content: str) -> None:
    # A content that spells "usage": {...} must not be read as the usage.
    assert usage_in(orjson.dumps(completion(content, None, tail=True))) is None


def test_usage_in_gives_up_on_what_it_cannot_read_plainly() -> None:
    assert usage_in(b"") is None
    assert usage_in(b"not json") is None
    assert usage_in(b'{"usage":{"prompt_tokens":1,"completion_tokens":') is None  # cut short
    assert usage_in(b'{"usage":{"prompt_tokens":"1","completion_tokens":2}}') is None  # a string
    assert usage_in(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == TokenUsage(3, 4)


@given(content=TRICKY, model=st.sampled_from(["m", "m2", "org/m", 'a"b', "é"]))
def test_usage_in_for_a_model_reads_only_a_completion_whose_first_model_key_names_it(
    content: str, model: str
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 7}
    body = completion(content, usage, tail=True)
    body["model"] = model
    raw = orjson.dumps(body)
    assert usage_in(raw, model) == TokenUsage(5, 7)
    assert usage_in(raw, "m-other") is None
    # An answer naming another model is not read for this one (the gateway renames it).
    renamed = orjson.dumps({**body, "model": "m-other"})
    assert usage_in(renamed, model) is None
    assert usage_in(renamed, "m-other") == TokenUsage(5, 7)
