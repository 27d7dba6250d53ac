"""Request validation names the offending field, as OpenAI's ``param`` does."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.schemas import ChatRequest, CompletionRequest, Endpoint, validate

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("patch", "param", "message"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "Invalid value"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"stream": "yes please"}, "stream", "valid boolean"),
        ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage", "boolean"),
        ({"model": None}, "model", "valid string"),
    ],
)
def test_chat_errors_name_the_field(patch: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate(Endpoint.CHAT, {**CHAT, **patch})
    assert err.value.param == param
    assert message in err.value.message
    assert err.value.status == 400


def test_missing_field() -> None:
    with pytest.raises(InvalidRequest) as err:
        validate(Endpoint.COMPLETIONS, {"model": "m"})
    assert (err.value.param, err.value.message) == (
        "prompt",
        "Missing required parameter: 'prompt'.",
    )


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        validate(Endpoint.CHAT, [CHAT])


def test_unknown_fields_are_kept() -> None:
    parsed = validate(Endpoint.CHAT, {**CHAT, "top_k": 5, "guided_json": {"type": "object"}})
    assert isinstance(parsed, ChatRequest)
    assert parsed.model_extra == {"top_k": 5, "guided_json": {"type": "object"}}


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt: Any) -> None:
    parsed = validate(Endpoint.COMPLETIONS, {"model": "m", "prompt": prompt})
    assert isinstance(parsed, CompletionRequest)
    assert parsed.prompt == prompt
