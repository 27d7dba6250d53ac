"""OpenAI request schemas: what the gateway checks before anything goes upstream.

The models validate the parsed body but are not what is forwarded: the
gateway forwards the client's own dict, so fields it does not know (vLLM's
extra sampling parameters, new OpenAI fields) reach vLLM untouched. Only the
fields the gateway relies on, or that would make vLLM fail obscurely, are
typed here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class Message(_Open):
    role: Role
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_Open):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


_ADAPTERS: dict[Endpoint, TypeAdapter[ChatRequest] | TypeAdapter[CompletionRequest]] = {
    Endpoint.CHAT: TypeAdapter(ChatRequest),
    Endpoint.COMPLETIONS: TypeAdapter(CompletionRequest),
}


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def validate(endpoint: Endpoint, body: Any) -> ChatRequest | CompletionRequest:
    """Check ``body`` against the endpoint's schema or raise ``InvalidRequest`` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return _ADAPTERS[endpoint].validate_python(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        # A union reports one error per member, each tagged with the member's
        # type name; the field itself is the prefix they share.
        loc = first["loc"]
        for other in errors[1:]:
            if other["loc"][:1] == loc[:1]:
                loc = _common_prefix(loc, other["loc"])
        param = _param(loc)
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {first['msg']}."
        raise InvalidRequest(message, param=param, code="invalid_value") from None


def _common_prefix(a: tuple[int | str, ...], b: tuple[int | str, ...]) -> tuple[int | str, ...]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
