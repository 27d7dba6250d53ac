"""The complexity score: bounds, monotonicity, reasons, weights validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from router.score import DEFAULT_WEIGHTS, ComplexityScorer, RouteScore, WeightsError


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(scope="module")
def scorer() -> ComplexityScorer:
    return ComplexityScorer.load()


def test_bounds(scorer: ComplexityScorer) -> None:
    huge = chat(("```python\ndef f(): return 1\n```\n" + r"$\int x^2$ why? " * 20) * 500)
    huge.update(max_tokens=100_000, tools=[{"type": "function"}])
    for body in ({}, chat("hi"), huge):
        assert 0.0 <= scorer.score(body).value <= 1.0
    assert scorer.score(huge).value > 0.99


def test_adding_code_or_math_raises_the_score(scorer: ComplexityScorer) -> None:
    base = "Please look at this."
    plain = scorer.score(chat(base)).value
    code = scorer.score(chat(base + "\n```python\ndef f(x):\n    return x\n```")).value
    math = scorer.score(chat(base + r" Prove $\sum_k k^2 = \frac{n(n+1)(2n+1)}{6}$.")).value
    assert code > plain
    assert math > plain
    assert scorer.score(chat(base, max_tokens=4000)).value > plain
    assert scorer.score(chat(base, tools=[{"type": "function"}])).value > plain


def test_reason_lists_top_contributions(scorer: ComplexityScorer) -> None:
    result = scorer.score(chat("Why does this python code fail?\n```python\nimport os\n```"))
    names = [name for name, _ in result.contributions]
    assert names[0] == "code"
    values = [value for _, value in result.contributions]
    assert values == sorted(values, reverse=True)
    reason = result.reason(top=2)
    assert reason.count("=") == 2
    assert reason.startswith("code=")


def test_reason_format_and_empty() -> None:
    score = RouteScore(0.5, (("code", 0.314), ("math", 0.12), ("long_prompt", 0.08), ("x", 0.01)))
    assert score.reason() == "code=0.31,math=0.12,long_prompt=0.08"
    assert RouteScore(0.1, ()).reason() == "no_signal"


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def default_data() -> dict[str, Any]:
    data = yaml.safe_load(DEFAULT_WEIGHTS.read_text())
    assert isinstance(data, dict)
    return data


def test_custom_weights_load(tmp_path: Path) -> None:
    data = default_data()
    data["bias"] = 0.0
    for spec in data["features"].values():
        spec["weight"] = 0.0
    assert ComplexityScorer.load(write(tmp_path, data)).score(chat("why code")).value == 0.5


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["features"].update(colour={"weight": 1, "scale": 1}), "unknown ['colour']"),
        (lambda d: d["features"].pop("code"), "missing ['code']"),
        (lambda d: d["features"]["math"].update(weight=-1), "features.math.weight"),
        (lambda d: d["features"]["math"].update(scale=0), "features.math.scale"),
        (lambda d: d["features"]["math"].update(transform="cube"), "features.math.transform"),
        (lambda d: d["features"]["math"].update(wieght=1), "features.math.wieght"),
        (lambda d: d.update(bias="high"), "bias"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_invalid_weights_fail_with_the_field(tmp_path: Path, mutate: Any, message: str) -> None:
    data = default_data()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(WeightsError, match=str(path)) as info:
        ComplexityScorer.load(path)
    assert message in str(info.value)


def test_unreadable_or_non_mapping_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="cannot read"):
        ComplexityScorer.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(WeightsError, match="mapping"):
        ComplexityScorer.load(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(WeightsError, match="not valid YAML"):
        ComplexityScorer.load(tmp_path / "bad.yaml")
