"""The response side of vLLM's OpenAI API: full bodies and SSE chunks.

One `Shaper` per request knows the request's id, creation time, model name and
kind (chat or text completion) and turns engine output into the exact JSON
vLLM sends: the same field names, the `null`s vLLM writes, the
`chat.completion.chunk` / `text_completion` objects, the finish_reason carried
on the chunk of the last token (vLLM does not send a separate empty chunk),
and the `choices: []` usage chunk. Both endpoints stream through this one class.
"""

from __future__ import annotations

from typing import Any

import orjson

from sim.protocol import Kind

DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


class Shaper:
    def __init__(
        self, kind: Kind, request_id: str, created: int, model: str, prompt_tokens: int
    ) -> None:
        self.kind = kind
        self.prompt_tokens = prompt_tokens
        self._head: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
        }

    def full(self, choices: list[tuple[str, str]], completion_tokens: int) -> bytes:
        """The non-streaming body; `choices` are (text, finish_reason) in index order."""
        body: dict[str, Any] = dict(self._head)
        if self.kind == "chat":
            body["object"] = "chat.completion"
            body["choices"] = [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                }
                for i, (text, reason) in enumerate(choices)
            ]
        else:
            body["choices"] = [
                {
                    "index": i,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
                for i, (text, reason) in enumerate(choices)
            ]
        body["service_tier"] = None
        body["system_fingerprint"] = None
        body["usage"] = {
            **usage(self.prompt_tokens, completion_tokens),
            "prompt_tokens_details": None,
        }
        body["prompt_logprobs"] = None
        body["kv_transfer_params"] = None
        return orjson.dumps(body)

    def role_chunk(self, index: int, continuous_usage: bool) -> bytes:
        """The opening chunk of a chat choice: the role and empty content."""
        chunk = dict(self._head)
        chunk["choices"] = [
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        if continuous_usage:
            chunk["usage"] = usage(self.prompt_tokens, 0)
        return sse(chunk)

    def token_chunk(
        self, index: int, text: str, finish_reason: str | None, cumulative: int | None
    ) -> bytes:
        """One token of one choice; `cumulative` (completion tokens so far) adds usage."""
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {
                "index": index,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        if finish_reason is not None or self.kind == "completion":
            choice["stop_reason"] = None
        chunk = dict(self._head)
        chunk["choices"] = [choice]
        if cumulative is not None:
            chunk["usage"] = usage(self.prompt_tokens, cumulative)
        return sse(chunk)

    def usage_chunk(self, completion_tokens: int) -> bytes:
        chunk = dict(self._head)
        chunk["choices"] = []
        chunk["usage"] = usage(self.prompt_tokens, completion_tokens)
        return sse(chunk)
