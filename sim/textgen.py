"""Deterministic "model output" and the simulator's tokenizer.

Tokenizer. A token is a run of 1-4 word characters, or one other non-space
character, together with the whitespace before it; trailing whitespace is
free. "Hello, world!" is `Hell`, `o`, `,`, ` worl`, `d`, `!` = 6 tokens. This is
near the ~4 characters per token of real BPE vocabularies on English and, unlike
a real tokenizer, costs one regex pass. Prompt tokens of a chat request are the
tokens of a ChatML-like rendering: every message adds 4 template tokens
(`<|im_start|>`, the role, a newline, `<|im_end|>`) and the generation prompt
adds 3 (`<|im_start|>`, `assistant`, a newline); a non-text content part (an
image...) counts as one token.

Output. A `TextGenerator` owns a fixed corpus of English-looking sentences made
of words of at most 4 letters, so every corpus entry is exactly one token of
the tokenizer above and `count_tokens(output_text) == completion_tokens`. A
request's output is a slice of the corpus: the request hash (model, prompt or
messages, sampling parameters except the length limits) picks the offset and
the natural length; the same request always gets the same text, and a shorter
`max_tokens` gives a prefix of the longer answer, as truncation would.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_TOKEN_RE = re.compile(r"\s*(?:\w{1,4}|[^\w\s])")

# Template tokens of the ChatML-like rendering (see module docstring).
_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"
GENERATION_PROMPT: tuple[str, ...] = (_IM_START, "assistant", "\n")

# Short words only: each must stay a single token once a space is put in front.
_WORD_LIST = """
    the a an of to in on at by for from with and or but not so as is are was be
    has had have do does did can may will more most many much some any each all
    one two ten few new old big long good best real same next last own high low
    cost time road toll fare gate lane map data node pool tier rate load call
    fast slow safe kept sent paid free busy idle full open shut left up down out
    over into onto past near far here then when what who how why this that them
    they we you it its our your my his her work plan test run read note line
    list word text page code file spec unit part step loop path turn sign
"""
_WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())

CORPUS_TOKENS = 32_768


def tokenize(text: str) -> list[str]:
    """Split text into simulator tokens (see module docstring)."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def _content_tokens(content: Any) -> list[str]:
    """Tokens of a message `content`: a string, or a list of parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return _TOKEN_RE.findall(content)
    tokens: list[str] = []
    for part in content:
        if part.get("type") == "text":
            tokens.extend(_TOKEN_RE.findall(str(part.get("text", ""))))
        else:
            # Images, audio...: one placeholder token each, enough for a test double.
            tokens.append(f"<{part.get('type')}>")
    return tokens


def render_chat(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Prompt tokens of a chat request, template tokens included."""
    tokens: list[str] = []
    for message in messages:
        tokens.append(_IM_START)
        tokens.append(str(message.get("role", "")))
        tokens.append("\n")
        tokens.extend(_content_tokens(message.get("content")))
        if message.get("tool_calls"):
            tokens.extend(_TOKEN_RE.findall(orjson.dumps(message["tool_calls"]).decode()))
        tokens.append(_IM_END)
    tokens.extend(GENERATION_PROMPT)
    return tokens


def request_key(material: Any) -> bytes:
    """A stable digest of everything that determines the output text."""
    blob = orjson.dumps(material, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(blob, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class OutputPlan:
    tokens: list[str]
    finish_reason: str


class TextGenerator:
    """Turns a request key into output tokens; the corpus is built once per app."""

    def __init__(self, seed: int, min_tokens: int, max_tokens: int) -> None:
        rng = random.Random(seed)
        corpus: list[str] = []
        start_of_sentence = True
        while len(corpus) < CORPUS_TOKENS:
            word = rng.choice(_WORDS)
            corpus.append(" " + (word.capitalize() if start_of_sentence else word))
            start_of_sentence = False
            roll = rng.random()
            if roll < 0.09:
                corpus.append(".")
                start_of_sentence = True
            elif roll < 0.14:
                corpus.append(",")
        self._corpus: tuple[str, ...] = tuple(corpus[:CORPUS_TOKENS])
        self._min = min_tokens
        self._span = max_tokens - min_tokens + 1

    def plan(
        self,
        key: bytes,
        index: int,
        *,
        room: int,
        max_tokens: int | None,
        min_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> OutputPlan:
        """Output of choice `index` of the request with `key`.

        `room` is what the context window leaves after the prompt; generation
        stops there with finish_reason "length", as in vLLM.
        """
        if index:
            key = hashlib.blake2b(key + index.to_bytes(4, "little"), digest_size=16).digest()
        h = int.from_bytes(key[:8], "little")
        limit = room if max_tokens is None else min(max_tokens, room)
        if ignore_eos:
            count, reason = limit, "length"
        else:
            natural = max(self._min + (h >> 32) % self._span, min_tokens)
            count, reason = (natural, "stop") if natural <= limit else (limit, "length")
        return OutputPlan(self._slice(h % CORPUS_TOKENS, count), reason)

    def _slice(self, offset: int, count: int) -> list[str]:
        corpus = self._corpus
        if corpus[offset] in (".", ","):
            offset += 1  # an answer should not open with punctuation
        out = list(corpus[offset : offset + count])
        while len(out) < count:
            out.extend(corpus[: count - len(out)])
        if out:
            out[0] = out[0].lstrip()
        return out
