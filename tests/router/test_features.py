"""Raw features from crafted request bodies."""

from __future__ import annotations

from typing import Any

from router.features import FEATURES, extract


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_every_feature_present_and_zero_for_empty_body() -> None:
    raw = extract({})
    assert set(raw) == set(FEATURES)
    assert all(v == 0 for v in raw.values())


def test_code_block_counts_code() -> None:
    body = chat("Fix this:\n```python\ndef f(x):\n    return x[0]\n```\nIt raises IndexError")
    assert extract(body)["code"] >= 4
    assert extract(chat("hello there"))["code"] == 0


def test_latex_and_math_words_count_math() -> None:
    raw = extract(chat(r"Prove that $\frac{a}{b} \le \sqrt{x^2}$ for every integer"))
    assert raw["math"] >= 5


def test_reasoning_cues_and_phrases() -> None:
    raw = extract(chat("Explain why, step by step, and compare the trade-offs."))
    assert raw["reasoning"] >= 4


def test_multi_part_list_items_and_questions() -> None:
    raw = extract(chat("Do these:\n1. summarise\n2. translate\n- then list risks?"))
    assert raw["multi_part"] >= 4


def test_turns_count_user_and_assistant_beyond_first() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c"}]},
        ]
    }
    assert extract(body)["turns"] == 2


def test_tokens_from_chars_and_content_parts() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 400}]}]}
    assert extract(body)["long_prompt"] == 100
    assert extract({"prompt": "y" * 4000})["long_prompt"] == 1000
    assert extract({"prompt": [[1, 2, 3]]})["long_prompt"] == 3


def test_long_prompt_scan_is_capped_but_tokens_are_not() -> None:
    text = "why " * 50_000
    raw = extract(chat(text), scan_chars=1000)
    assert raw["long_prompt"] == len(text) / 4
    assert raw["reasoning"] <= 260


def test_max_tokens_tools_and_response_format() -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    fmt = {"type": "json_schema"}
    raw = extract(chat("hi", max_tokens=1000, tools=[tool], response_format=fmt))
    assert (raw["max_tokens"], raw["tools"], raw["response_format"]) == (1000, 1, 1)
    assert extract(chat("hi", max_completion_tokens=50))["max_tokens"] == 50
    assert extract(chat("hi", response_format={"type": "json_object"}))["response_format"] == 0.5
    assert extract(chat("hi", tools=[]))["tools"] == 0


def test_malformed_shapes_are_ignored() -> None:
    body = {"messages": ["nope", {"role": "user", "content": 3}], "max_tokens": True}
    assert extract(body)["long_prompt"] == 0
    assert extract(body)["max_tokens"] == 0
