"""The OpenTelemetry GenAI semantic conventions as plain data: no SDK, no spans.

Turns a request body, a finished ``RequestReport`` and what was said into the
attribute dicts ``metering.telemetry`` sets on spans. Choices, per the GenAI
conventions of today (``gen_ai.client.inference``, still Development, so the
latest version is emitted):

- Errors follow "Recording Errors" and the HTTP client rules that go with
  CLIENT: a request that produced no completion failed, so status >= 400 or a
  ``report.error_type`` (say a stream broken after its 200) sets ``error.type``
  (the report's type, else the status code); with no finish reason received,
  ``gen_ai.response.finish_reasons`` is ``["error"]``.
- Cost: the proposed ``gen_ai.usage.cost.*`` (marginal USD as a double, source
  ``local``: tollway priced it itself); everything else as ``tollway.*``.
- Content: ``gen_ai.input.messages`` and ``gen_ai.output.messages`` in the
  conventions' ``role``/``parts`` schema, as structured attribute values (the
  SDK exports them as OTLP arrays/maps; the conventions prefer that to JSON
  strings).

Every function here is pure; ill-typed input is skipped or raises, and the
caller (``metering.telemetry``) keeps either from failing a request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from metering.money import NANOS_PER_USD
from metering.report import RequestReport

PROVIDER = "vllm"

_FLOAT_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
}
_OUTPUT_TYPES = {"text": "text", "json_object": "json", "json_schema": "json"}


@dataclass(frozen=True, slots=True)
class Content:
    """What was said, shaped as OpenAI shapes it; converted only if content is recorded.

    ``input``: the request's ``messages`` (chat) or ``prompt`` (text_completion).
    ``choices``: the response's ``choices``; a stream passes those it assembled,
    ``{"message": {"role": "assistant", "content": text}}`` or ``{"text": text}``.
    """

    input: Any
    choices: Sequence[Mapping[str, Any]] = ()


def request_attributes(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``gen_ai.request.*`` attributes of an OpenAI request body; ill-typed values skipped."""
    out: dict[str, Any] = {}
    max_tokens = params.get("max_completion_tokens", params.get("max_tokens"))
    if _is_int(max_tokens):
        out["gen_ai.request.max_tokens"] = max_tokens
    if _is_int(seed := params.get("seed")):
        out["gen_ai.request.seed"] = seed
    if _is_int(top_k := params.get("top_k")) and top_k > 0:  # vLLM: -1 or 0 is "off"
        out["gen_ai.request.top_k"] = top_k
    for key, attr in _FLOAT_PARAMS.items():
        if _is_int(value := params.get(key)) or isinstance(value, float):
            out[attr] = float(value)
    if _is_int(n := params.get("n")) and n != 1:
        out["gen_ai.request.choice.count"] = n
    if params.get("stream") is True:
        out["gen_ai.request.stream"] = True
    stop = params.get("stop")
    if isinstance(stop, str):
        out["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        out["gen_ai.request.stop_sequences"] = list(stop)  # a copy: read at export
    response_format = params.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if isinstance(kind, str) and kind in _OUTPUT_TYPES:
        out["gen_ai.output.type"] = _OUTPUT_TYPES[kind]
    if isinstance(effort := params.get("reasoning_effort"), str):
        out["gen_ai.request.reasoning.level"] = effort
    return out


def report_attributes(report: RequestReport, response_model: str | None = None) -> dict[str, Any]:
    """Usage, cost and outcome attributes of a finished request, errors included."""
    out: dict[str, Any] = {
        "gen_ai.response.model": response_model or report.model,
        "gen_ai.usage.input_tokens": report.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": report.usage.completion_tokens,
        "gen_ai.usage.cost.amount": report.cost.marginal_nanos / NANOS_PER_USD,
        "gen_ai.usage.cost.currency": "USD",
        "gen_ai.usage.cost.source": "local",
        "tollway.request_id": report.request_id,
        "tollway.tenant": report.tenant,
        "tollway.tier": report.tier,
        "tollway.cache": report.cache,
        "tollway.gpu_seconds": report.gpu_seconds,
        "tollway.cost.loaded_usd": report.cost.loaded_nanos / NANOS_PER_USD,
        "tollway.attempts": report.attempts,
    }
    if report.usage.cached_prompt_tokens:
        out["gen_ai.usage.cache_read.input_tokens"] = report.usage.cached_prompt_tokens
    if report.response_id:
        out["gen_ai.response.id"] = report.response_id
    if report.free:
        out["tollway.cost.saved_usd"] = report.saved_nanos / NANOS_PER_USD
    if report.replica:
        out["tollway.replica"] = report.replica
    error = error_type(report)
    if error is not None:
        out["error.type"] = error
    if report.finish_reasons or error is not None:
        out["gen_ai.response.finish_reasons"] = list(report.finish_reasons) or ["error"]
    return out


def error_type(report: RequestReport) -> str | None:
    """The request's ``error.type``: the gateway's own type, else a failing status code."""
    if report.error_type:
        return report.error_type
    return str(report.status) if report.status >= 400 else None


def content_attributes(operation: str, content: Content) -> dict[str, Any]:
    """``gen_ai.input.messages`` and ``gen_ai.output.messages``, structured."""
    if operation == "chat":
        messages = content.input if isinstance(content.input, list) else ()
        inputs = [_chat_message(m, "user") for m in messages if isinstance(m, Mapping)]
        outputs = [_chat_message(c.get("message") or {}, "assistant") for c in content.choices]
    else:
        prompts = [content.input] if isinstance(content.input, str) else content.input
        inputs = [_message("user", [_text(p)]) for p in prompts if isinstance(p, str)]
        outputs = [_message("assistant", [_text(c.get("text"))]) for c in content.choices]
    return {"gen_ai.input.messages": inputs, "gen_ai.output.messages": outputs}


def _chat_message(message: Mapping[str, Any], default_role: str) -> dict[str, Any]:
    role = message.get("role") or default_role
    parts: list[dict[str, Any]] = []
    if isinstance(reasoning := message.get("reasoning_content") or message.get("reasoning"), str):
        parts.append(_part(type="reasoning", content=reasoning))
    body = message.get("content")
    if role == "tool":
        parts.append(
            _part(type="tool_call_response", id=message.get("tool_call_id"), response=body)
        )
    elif isinstance(body, str):
        parts.append(_text(body))
    else:
        parts.extend(_openai_part(p) for p in body or () if isinstance(p, Mapping))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        name, arguments = function.get("name"), function.get("arguments")
        parts.append(_part(type="tool_call", id=call.get("id"), name=name, arguments=arguments))
    out = _message(role, parts)
    if isinstance(participant := message.get("name"), str):
        out["name"] = participant
    return out


def _openai_part(part: Mapping[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return _text(part.get("text"))
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url")
        return _part(type="uri", modality="image", uri=url)
    return {"type": str(kind)}  # other kinds are named, their payload left out


def _message(role: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": role, "parts": parts}


def _text(text: Any) -> dict[str, Any]:
    return _part(type="text", content=text)


def _part(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
