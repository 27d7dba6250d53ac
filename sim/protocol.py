"""The request side of vLLM's OpenAI API, and its error shape.

Request models accept and ignore unknown fields (vLLM logs and ignores them);
what they validate, and the messages they use, follow vLLM: a bad request is a
400, an unknown model a 404, both in the body vLLM's `create_error_response`
builds today:

    {"error": {"message": "...", "type": "BadRequestError", "param": null, "code": 400}}

`SimError` carries such an answer from wherever it is detected to the handler.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Request fields that change what a real model would sample, hence the output
# text. The length limits are left out on purpose: a lower max_tokens must
# truncate the same answer.
SAMPLING_FIELDS: tuple[str, ...] = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "response_format",
)


def error_type(status: int) -> str:
    """vLLM's error `type` names: "BadRequestError", "NotFoundError", "InternalServerError"..."""
    name = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    return name if name.endswith("Error") else name + "Error"


def error_body(message: str, status: int, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}
    )


class SimError(Exception):
    """An error answer: status, message and the offending parameter."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.status, self.param)

    @classmethod
    def invalid(cls, exc: ValidationError) -> SimError:
        """A 400 naming the first invalid field, from a pydantic error."""
        first = exc.errors()[0]
        loc = first["loc"]
        where = ".".join(str(part) for part in loc)
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return cls(message, 400, str(loc[0]) if loc else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # vLLM's default: asking for stream_options at all turns usage on.
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class GenerationRequest(BaseModel):
    """Fields both endpoints share; the length limit and prompt differ by endpoint."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    n: int = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    def limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        opts = self.stream_options
        return bool(opts and opts.include_usage and opts.continuous_usage_stats)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def limit(self) -> int | None:
        # vLLM prefers the newer name when both are given.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string, a list of them, token ids, or lists of ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise SimError("Prompt cannot be empty", 400, "prompt")
        if isinstance(p[0], int):
            return [p]
        return list(p)


Kind = Literal["chat", "completion"]


def decode_json(body: bytes) -> dict[str, Any]:
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SimError(f"Invalid JSON body: {exc}") from None
    if not isinstance(raw, dict):
        raise SimError("The request body must be a JSON object")
    return raw


def validate_request(kind: Kind, raw: dict[str, Any]) -> GenerationRequest:
    """Validate a decoded body like vLLM does; raises SimError (400)."""
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req: GenerationRequest = model.model_validate(raw)
    except ValidationError as exc:
        raise SimError.invalid(exc) from None
    if req.stream_options is not None and not req.stream:
        raise SimError("Stream options can only be defined when `stream=True`.", 400, "stream")
    limit = req.limit()
    if limit is not None and limit < 1:
        raise SimError(f"max_tokens must be at least 1, got {limit}.", 400, "max_tokens")
    return req
