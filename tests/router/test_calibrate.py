"""Calibration on the shipped prompt set, the config write and the CLI."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml

from router.calibrate import calibrate, load_labelled, load_prompts, share_at, write_threshold
from router.cli import configure_parser, run
from router.score import ComplexityScorer

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "bench" / "routing" / "prompts.jsonl"
LOCAL_CONFIG = REPO / "deploy" / "local" / "tollway.yaml"


@pytest.fixture(scope="module")
def scores() -> list[float]:
    scorer = ComplexityScorer.load()
    return [scorer.score(body).value for body in load_prompts(PROMPTS)]


def test_shipped_set_is_big_labelled_and_sourced() -> None:
    prompts = load_labelled(PROMPTS)
    assert len(prompts) >= 200
    assert {p.label for p in prompts} == {"easy", "hard"}
    assert all(p.source for p in prompts)


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_calibration_hits_share_within_2_percent(scores: list[float], share: float) -> None:
    assert abs(share_at(scores, calibrate(scores, share)) - share) <= 0.02


def test_ties_and_ends() -> None:
    tied = [0.2] * 5 + [0.8] * 5
    assert share_at(tied, calibrate(tied, 0.5)) == 0.5
    assert share_at(tied, calibrate(tied, 0.6)) == 0.5  # cannot split the 0.2s
    assert share_at(tied, calibrate(tied, 0.0)) == 0.0
    assert share_at(tied, calibrate(tied, 1.0)) == 1.0
    assert share_at([1.0], calibrate([1.0], 0.0)) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        calibrate([], 0.3)
    with pytest.raises(ValueError, match="large_share"):
        calibrate([0.1], 1.5)


def test_load_prompts_forms(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "hi", "label": "easy", "source": "me"},
        {"messages": [{"role": "user", "content": "x"}], "tools": [], "label": "hard"},
        {"prompt": "Once", "max_tokens": 5},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    bodies = load_prompts(path)
    assert bodies[0] == {"messages": [{"role": "user", "content": "hi"}]}
    assert bodies[1] == {"messages": [{"role": "user", "content": "x"}], "tools": []}
    assert bodies[2] == {"messages": [{"role": "user", "content": "Once"}]}
    path.write_text('{"prompt": "a", "label": "medium"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: label"):
        load_prompts(path)


def test_write_threshold_round_trip_keeps_comments(tmp_path: Path) -> None:
    config = tmp_path / "tollway.yaml"
    shutil.copy(LOCAL_CONFIG, config)
    before = yaml.safe_load(config.read_text())
    before["routing"].pop("cut_points", None)  # the shipped config may already have one
    write_threshold(config, 0.25)
    write_threshold(config, 0.375)  # replaces, not duplicates
    text = config.read_text()
    after = yaml.safe_load(text)
    assert after["routing"]["cut_points"] == [0.375]
    assert text.count("cut_points") == 1
    after["routing"].pop("cut_points")
    assert after == before
    assert "# tollway on one machine" in text


@pytest.mark.parametrize(
    "original",
    [
        "a: 1\n",
        "routing:\n  aliases: [auto]\n  cut_points:\n    - 0.1\n    - 0.2\n  default_tier: s\n",
        "routing: {aliases: [auto]}\nb: 2\n",
    ],
)
def test_write_threshold_shapes(tmp_path: Path, original: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(original)
    write_threshold(config, 0.5)
    data = yaml.safe_load(config.read_text())
    assert data["routing"]["cut_points"] == [0.5]
    expected = yaml.safe_load(original)
    expected.setdefault("routing", {})["cut_points"] = [0.5]
    assert data == expected


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(argv)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tollway.yaml"
    shutil.copy(LOCAL_CONFIG, config)
    uncalibrated = [ln for ln in config.read_text().splitlines() if "cut_points:" not in ln]
    config.write_text("\n".join(uncalibrated) + "\n")  # as if never calibrated
    args = ["calibrate", "--config", str(config), "--prompts", str(PROMPTS)]
    assert run(parse(*args, "--large-share", "0.3", "--dry-run")) == 0
    assert "cut_points:" not in config.read_text()  # a dry run writes nothing
    assert run(parse(*args, "--large-share", "0.3")) == 0
    assert "large tier" in capsys.readouterr().out
    threshold = yaml.safe_load(config.read_text())["routing"]["cut_points"][0]
    scorer = ComplexityScorer.load()
    scores = [scorer.score(b).value for b in load_prompts(PROMPTS)]
    assert abs(share_at(scores, threshold) - 0.3) <= 0.02


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tollway.yaml"
    shutil.copy(LOCAL_CONFIG, config)
    args = ["calibrate", "--config", str(config), "--prompts", str(PROMPTS)]
    assert run(parse(*args, "--large-share", "1.5")) == 2
    assert run(parse(*args, "--weights", str(tmp_path / "nope.yaml"))) == 2
    assert "cannot read" in capsys.readouterr().err
