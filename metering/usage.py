"""Token counts from vLLM's ``usage`` object, for whole responses and for streams.

Whole responses: the answer is parsed once and its ``usage`` read with
``TokenUsage.from_openai``. Streams: the gateway asks vLLM for
``include_usage`` and ``continuous_usage_stats``, so every chunk carries the
cumulative usage so far and a stream the client aborts is still billed for
what was generated; ``StreamUsage`` keeps the latest figures.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeGuard


class TokenUsage(NamedTuple):
    """A request's token counts, as vLLM's ``usage`` gives them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> TokenUsage | None:
        """Parse an OpenAI/vLLM ``usage`` object; None when absent or malformed.

        Counts must be JSON integers, none negative (``true`` is not a count).
        """
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not _count(prompt) or not _count(completion):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return cls(prompt, completion, cached if _count(cached) else 0)


NO_USAGE = TokenUsage()


def _count(value: Any) -> TypeGuard[int]:
    return type(value) is int and value >= 0


class StreamUsage:
    """The latest cumulative usage seen on a stream's chunks."""

    def __init__(self) -> None:
        self.latest: TokenUsage | None = None

    def observe(self, chunk: dict[str, Any]) -> None:
        usage = TokenUsage.from_openai(chunk.get("usage"))
        if usage is not None:
            self.latest = usage
