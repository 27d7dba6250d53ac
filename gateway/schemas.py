"""OpenAI request schemas: what the gateway checks before anything goes upstream.

The structs validate the parsed body but are not what is forwarded: the
gateway forwards the client's own dict, so fields it does not know (vLLM's
extra sampling parameters, new OpenAI fields) reach vLLM untouched. Only the
fields the gateway relies on, or that would make vLLM fail obscurely, are
typed here.

Validation is ``msgspec.convert`` into structs that ignore unknown fields: a
body of 100,000 messages is checked in milliseconds and a few MB, where a
model object per message cost hundreds of milliseconds and tens of MB that
the allocator then kept. Types are strict, as OpenAI's schema is: ``"true"``
is not a boolean, ``1.5`` is not a token count.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.errors import InvalidRequest


class Endpoint(StrEnum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self is Endpoint.CHAT else "/v1/completions"

    @property
    def operation(self) -> str:
        """The GenAI semantic-convention operation name."""
        return "chat" if self is Endpoint.CHAT else "text_completion"


class StreamOptions(msgspec.Struct, gc=False):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class Message(msgspec.Struct, gc=False):
    role: Role
    content: str | list[dict[str, Any]] | None = None


class _Sampling(msgspec.Struct, kw_only=True, gc=False):
    model: Annotated[str, Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None

    @property
    def max_output(self) -> int | None:
        """The most tokens one choice may generate, if the request says."""
        return self.max_tokens

    @property
    def choices(self) -> int:
        """How many completions it asks for."""
        return self.n or 1


class ChatRequest(_Sampling, kw_only=True, gc=False):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None

    @property
    def max_output(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling, kw_only=True, gc=False):
    # A string, or a list of strings, of token ids, or of lists of token ids (checked below:
    # a msgspec union holds one list type).
    prompt: str | list[Any]

    @property
    def choices(self) -> int:
        """n for each prompt: a list of strings, or of token-id lists, is several prompts."""
        prompt = self.prompt
        several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        return (self.n or 1) * (len(prompt) if several else 1)


_TYPES: dict[Endpoint, type[ChatRequest] | type[CompletionRequest]] = {
    Endpoint.CHAT: ChatRequest,
    Endpoint.COMPLETIONS: CompletionRequest,
}
_MISSING = re.compile(r"Object missing required field `(.+)`")


def validate(endpoint: Endpoint, body: Any) -> ChatRequest | CompletionRequest:
    """Check ``body`` against the endpoint's schema or raise ``InvalidRequest`` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        parsed = msgspec.convert(body, _TYPES[endpoint])
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    if isinstance(parsed, CompletionRequest) and not _prompt_form(parsed.prompt):
        raise _invalid(
            "Expected a string, or an array of strings, of token ids or of arrays of token ids"
            " - at `$.prompt`"
        )
    return parsed


def _prompt_form(prompt: str | list[Any]) -> bool:
    if isinstance(prompt, str):
        return True
    if all(isinstance(p, str) for p in prompt):
        return True
    if all(type(p) is int for p in prompt):
        return True
    return all(isinstance(p, list) and all(type(t) is int for t in p) for p in prompt)


def _invalid(text: str) -> InvalidRequest:
    """msgspec's "<what> - at `$.a[0].b`" as OpenAI's error, the field as ``param``."""
    what, _, where = text.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").removeprefix(".")
    missing = _MISSING.fullmatch(what)
    if missing is not None:
        param = f"{path}.{missing[1]}" if path else missing[1]
        return InvalidRequest(
            f"Missing required parameter: '{param}'.", param=param, code="invalid_value"
        )
    return InvalidRequest(
        f"Invalid value for '{path}': {what}.", param=path or None, code="invalid_value"
    )
