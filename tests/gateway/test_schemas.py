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
        ({"messages": []}, "messages", "length >= 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'robot'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "Invalid value"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "Missing required parameter"),
        ({"temperature": 3}, "temperature", "<= 2"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_tokens": 1.5}, "max_tokens", "got `float`"),
        ({"stream": "yes please"}, "stream", "`bool`"),
        ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage", "`bool"),
        ({"model": None}, "model", "`str`"),
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


def test_unknown_fields_pass() -> None:
    """Fields the gateway does not know are not checked (the client's dict is forwarded)."""
    body = {**CHAT, "top_k": 5, "guided_json": {"type": "object"}}
    body["messages"] = [{"role": "assistant", "tool_calls": [{"id": "t"}], "name": "x"}]
    parsed = validate(Endpoint.CHAT, body)
    assert isinstance(parsed, ChatRequest)
    assert (parsed.model, parsed.stream, parsed.messages[0].content) == ("m", False, None)


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt: Any) -> None:
    parsed = validate(Endpoint.COMPLETIONS, {"model": "m", "prompt": prompt})
    assert isinstance(parsed, CompletionRequest)
    assert parsed.prompt == prompt


@pytest.mark.parametrize("prompt", [["a", 1], [[1, "2"]], [True], [{"x": 1}], 5])
def test_other_prompt_forms_are_refused(prompt: Any) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate(Endpoint.COMPLETIONS, {"model": "m", "prompt": prompt})
    assert err.value.param == "prompt"


def test_many_messages_validate() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 100_000}
    parsed = validate(Endpoint.CHAT, body)
    assert isinstance(parsed, ChatRequest)
    assert len(parsed.messages) == 100_000
