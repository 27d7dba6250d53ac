"""Token counts from vLLM's ``usage`` object, for whole responses and for streams.

Streams: the gateway asks vLLM for ``include_usage`` and
``continuous_usage_stats``, so every chunk carries the cumulative usage so far
and a stream the client aborts is still billed for what was generated.
``StreamUsage`` keeps the latest figures.

Whole responses: ``usage_in`` reads the ``usage`` object out of a response's
bytes without parsing the rest, for answers the gateway relays unread (not
stored, not traced): parsing the whole completion, and freeing it, cost more
than any other step of metering a request, and its cost grows with the
completion's length (bench/RESULTS.md). The ``usage`` object alone is decoded
by ``msgspec`` straight into the fields read, without a dict.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import msgspec
import orjson

_USAGE_KEY = b'"usage":'
_MODEL_KEY = b'"model":'


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    """The ``usage`` object's fields metering reads (others are skipped), checked as it is
    decoded: counts are JSON integers (``true`` is not a count)."""

    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_details: _Details | None = None


_decode_usage = msgspec.json.Decoder(_Usage).decode


class TokenUsage(NamedTuple):
    """Immutable, and a tuple: made once per request, so it must be cheap to make."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> TokenUsage | None:
        """Parse an OpenAI/vLLM ``usage`` object; None when absent or malformed.

        Counts must be JSON integers (``true`` is not a count).
        """
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if type(prompt) is not int or type(completion) is not int:
            return None
        details = usage.get("prompt_tokens_details")
        if details is None:  # vLLM without prefix caching: the common answer
            return cls(prompt, completion)
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return cls(prompt, completion, cached if type(cached) is int else 0)


NO_USAGE = TokenUsage()
# TokenUsage((prompt, completion, cached)) without the Python-level ``__new__``: the hot path's.
_usage: Callable[[tuple[int, int, int]], TokenUsage] = partial(tuple.__new__, TokenUsage)


class _ModelKeys(dict[str, bytes]):
    """``"model":"<name>"`` as vLLM spells it, by name: made once per model name (the
    tiers' models, a bounded set)."""

    def __missing__(self, model: str) -> bytes:
        key = self[model] = _MODEL_KEY + orjson.dumps(model)
        return key


MODEL_KEYS = _ModelKeys()


def names_model(body: bytes, model: str) -> bool:
    """Whether a JSON completion's first ``"model"`` key is ``model``, spelled as vLLM
    spells JSON (``usage_in``'s check, alone: with metering off)."""
    at = body.find(_MODEL_KEY)
    return at >= 0 and body.startswith(MODEL_KEYS[model], at)


def usage_in(body: bytes, model: str | None = None) -> TokenUsage | None:
    """The ``usage`` of a JSON completion, parsed alone; None when it is not found plainly.

    With ``model``, also None unless the completion's first ``"model"`` key is
    ``model`` as vLLM spells JSON (``names_model``): the gateway relays such an
    answer unread, any other it parses whole (to rename the model). One call
    for both, the check written inline, since it runs on every relayed answer.

    Takes the last ``"usage":`` (inside a JSON string every quote is escaped,
    so these bytes are a key), and decodes from there to the first closing
    brace, straight into the fields read (vLLM's usage without details), or
    else to the closing brace that balances the braces before it (usage
    objects hold numbers, null and nested objects, no strings with braces;
    one that did would fail to decode). None (absent, ``null``, an odd shape)
    means: parse the whole body instead.
    """
    if model is not None:
        at = body.find(_MODEL_KEY)
        if at < 0 or not body.startswith(MODEL_KEYS[model], at):
            return None
    at = body.rfind(_USAGE_KEY)
    if at < 0:
        return None
    start = at + len(_USAGE_KEY)
    end = body.find(b"}", start)
    try:
        usage = _decode_usage(body[start : end + 1])
    except msgspec.DecodeError:  # details as an object, or not a usage object at all
        while end >= 0 and body.count(b"{", start, end) > body.count(b"}", start, end) + 1:
            end = body.find(b"}", end + 1)
        if end < 0:
            return None
        try:
            usage = _decode_usage(body[start : end + 1])
        except msgspec.DecodeError:
            return None
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else None
    return _usage((usage.prompt_tokens, usage.completion_tokens, cached or 0))


class StreamUsage:
    """The latest cumulative usage seen on a stream's chunks."""

    def __init__(self) -> None:
        self.latest: TokenUsage | None = None

    def observe(self, chunk: dict[str, Any]) -> None:
        usage = TokenUsage.from_openai(chunk.get("usage"))
        if usage is not None:
            self.latest = usage
