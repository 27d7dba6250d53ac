"""Raw request features for the complexity score: pure, cheap, no I/O.

``extract`` reads an OpenAI request body (chat ``messages`` with string or
list-of-parts content, or completions ``prompt``) and returns one raw number
per feature named in ``FEATURES``. Text is collected once, then scanned with
``str.count`` for symbols, one precompiled word regex plus a dict lookup for
keywords, and a line loop for list items and code line shapes; capped at
``scan_chars`` characters (half from the start, half from the end) so the
cost is bounded. Prompt tokens are estimated as characters / 4 over the full
text. Malformed shapes are ignored rather than raised: validating the body
is the gateway's job, scoring must never fail a request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

FEATURES: tuple[str, ...] = (
    "long_prompt",
    "turns",
    "code",
    "math",
    "reasoning",
    "max_tokens",
    "tools",
    "response_format",
    "multi_part",
)

CHARS_PER_TOKEN = 4


def _words(feature: str, words: str) -> dict[str, str]:
    return dict.fromkeys(words.split(), feature)


# Lower-cased whole words -> the feature they count for (a dict lookup per word
# is far cheaper than a long regex alternation tried at every position).
_KEYWORDS: dict[str, str] = {
    **_words(
        "code",
        "def class import return function lambda async await python javascript typescript"
        " java rust golang c++ sql bash regex kubernetes docker api json yaml html css code"
        " script compile compiler compiled debug debugging debugger bug bugs segfault"
        " refactor refactoring implement implementation implementing algorithm algorithms"
        " recursion recursive thread threads threading deadlock pointer null undefined"
        " unittest pytest traceback printf console stdout",
    ),
    **_words(
        "math",
        "integral derivative differentiate equation equations theorem prove proof lemma"
        " probability variance matrix matrices eigenvalue eigenvalues eigenvector"
        " eigenvectors polynomial polynomials modulo prime primes divisible remainder"
        " inequality combinatorics permutation permutations integer integers",
    ),
    **_words(
        "reasoning",
        "why explain explains explanation analyze analyse analysis analyzing analysing"
        " compare comparison contrast trade-off trade-offs tradeoff tradeoffs evaluate"
        " assess assessment justify derive reason reasoning critique design architecture"
        " implication implications strategy strategies optimize optimise optimization"
        " optimisation plan argue counterargument hypothesis hypotheses diagnose"
        " diagnosis estimate deduce",
    ),
    **_words("multi_part", "then also additionally finally first second third next afterwards"),
}
_PHRASES: tuple[tuple[str, str], ...] = (
    ("step by step", "reasoning"),
    ("step-by-step", "reasoning"),
    ("pros and cons", "reasoning"),
    ("root cause", "reasoning"),
    ("show that", "math"),
    ("solve for", "math"),
    ("expected value", "math"),
    ("after that", "multi_part"),
)
_WORD = re.compile(r"[a-z][a-z+\-]*")
# Symbols are counted with str.count (C speed); only line shapes need a loop.
_CODE_SYMBOLS = ("```", "=>", "->", "::", "#include")
_MATH_SYMBOLS = ("\\", "^", "=", "≤", "≥", "∑", "∫", "√", "π", "∞")
_ARITHMETIC = re.compile(r"\d\s*[*/]\s*\d")
_LIST_ITEM = re.compile(r"(?:\d{1,2}[.)]|[-*•])[ \t]")


def _symbol_counts(text: str, counts: dict[str, int]) -> None:
    counts["code"] += sum(text.count(symbol) for symbol in _CODE_SYMBOLS)
    counts["math"] += sum(text.count(symbol) for symbol in _MATH_SYMBOLS)
    counts["math"] += text.count("$") // 2 + len(_ARITHMETIC.findall(text))
    counts["multi_part"] += text.count("?")
    if "\n" in text:
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            if stripped[-1] in ";{" or stripped[0] == "}":
                counts["code"] += 1
            elif _LIST_ITEM.match(stripped):
                counts["multi_part"] += 1


def _content_text(content: Any, out: list[str]) -> None:
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, str):
                out.append(part)


def _texts(body: Mapping[str, Any]) -> tuple[list[str], int, int]:
    """The text pieces, the conversation turns and any pre-tokenised prompt length."""
    texts: list[str] = []
    turns = 0
    token_ids = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            if message.get("role") in ("user", "assistant"):
                turns += 1
            _content_text(message.get("content"), texts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
        turns = max(turns, 1)
    elif isinstance(prompt, list) and prompt:
        turns = max(turns, 1)
        for item in prompt:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, int):
                token_ids += 1  # a single pre-tokenised prompt
            elif isinstance(item, list):
                token_ids += len(item)
    return texts, turns, token_ids


def _max_tokens(body: Mapping[str, Any]) -> float:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 0.0


def _response_format(body: Mapping[str, Any]) -> float:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "json_schema":
        return 1.0
    if kind == "json_object":
        return 0.5
    return 0.0


def extract(body: Mapping[str, Any], scan_chars: int = 6000) -> dict[str, float]:
    """Raw feature values (counts, tokens, flags) for one request body."""
    texts, turns, token_ids = _texts(body)
    text = "\n".join(texts)
    if len(text) > scan_chars:
        half = scan_chars // 2
        text_scanned = text[:half] + "\n" + text[-half:]
    else:
        text_scanned = text
    counts = {"code": 0, "math": 0, "reasoning": 0, "multi_part": 0}
    _symbol_counts(text_scanned, counts)
    lowered = text_scanned.lower()
    keywords = _KEYWORDS
    for word in _WORD.findall(lowered):
        feature = keywords.get(word)
        if feature is not None:
            counts[feature] += 1
        elif word.endswith(("error", "exception")) and len(word) > 5:
            counts["code"] += 1
    for phrase, feature in _PHRASES:
        if phrase in lowered:
            counts[feature] += lowered.count(phrase)
    tools = body.get("tools") or body.get("functions")
    return {
        "long_prompt": len(text) / CHARS_PER_TOKEN + token_ids,
        "turns": float(max(turns - 1, 0)),
        "code": float(counts["code"]),
        "math": float(counts["math"]),
        "reasoning": float(counts["reasoning"]),
        "max_tokens": _max_tokens(body),
        "tools": 1.0 if isinstance(tools, list) and tools else 0.0,
        "response_format": _response_format(body),
        "multi_part": float(counts["multi_part"]),
    }
