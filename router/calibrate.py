"""Calibration, after RouteLLM: pick the threshold that sends a share of a sample up.

``calibrate`` works on scores already computed; ``load_prompts`` and
``load_labelled`` read a JSONL sample; ``write_threshold`` stores the result
as ``routing.cut_points: [threshold]`` in the gateway's YAML config.

``write_threshold`` edits the text of the file, not a re-dump of it, so
comments, ``${ENV:-default}`` placeholders and key order survive: it
replaces an existing ``cut_points:`` line inside the top-level ``routing:``
block (flow or block list), or inserts one as the block's first key, or
appends a ``routing:`` block. It then parses the new text and checks that
only ``routing.cut_points`` changed; if the file's shape defeats the textual
edit (say ``routing: {...}`` in flow style), it falls back to a PyYAML
re-dump, which loses comments.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_META_KEYS = ("label", "source")


@dataclass(frozen=True, slots=True)
class LabelledPrompt:
    body: dict[str, Any]
    label: str | None  # "easy" or "hard" when labelled
    source: str | None


def calibrate(scores: Sequence[float], large_share: float) -> float:
    """The threshold whose share of ``scores >= threshold`` is closest to ``large_share``.

    Equal scores cannot be split, so only shares at distinct score values are
    reachable; of two equally close, the smaller share (cheaper) wins. The
    threshold returned is the midpoint between the lowest score sent up and
    the next lower score (or 0.0 / above the maximum at the ends), so a new
    prompt scoring between sample points is not decided by a hair.
    """
    if not scores:
        raise ValueError("calibration needs at least one score")
    if not 0.0 <= large_share <= 1.0:
        raise ValueError(f"large_share must be in [0, 1], got {large_share}")
    ordered = sorted(scores, reverse=True)
    n = len(ordered)
    target = large_share * n
    # candidate k: the k highest scores go large (k = 0 .. n), only at value changes
    best_k, best_gap = 0, float(target)
    for k in range(1, n + 1):
        if k < n and ordered[k] == ordered[k - 1]:
            continue  # cannot cut inside a run of equal scores
        gap = abs(k - target)
        if gap < best_gap:
            best_k, best_gap = k, gap
    if best_k == 0:
        top = ordered[0]
        return (top + 1.0) / 2 if top < 1.0 else math.nextafter(top, math.inf)
    if best_k == n:
        return 0.0
    return (ordered[best_k - 1] + ordered[best_k]) / 2


def share_at(scores: Sequence[float], threshold: float) -> float:
    """The share of ``scores`` at or above ``threshold``."""
    return sum(1 for s in scores if s >= threshold) / len(scores) if scores else 0.0


def _body(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "messages" in record or ("prompt" in record and not isinstance(record["prompt"], str)):
        return {k: v for k, v in record.items() if k not in _META_KEYS}
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return {"messages": [{"role": "user", "content": prompt}]}
    raise ValueError(f"{where}: expected an OpenAI request body or a 'prompt' string")


def load_labelled(path: Path) -> list[LabelledPrompt]:
    """Read JSONL: each line a request body or ``{"prompt", "label", "source"}``.

    A body may carry ``label`` and ``source`` too; they are removed from it.
    A plain ``{"prompt": "..."}`` becomes a one-message chat body.
    """
    out: list[LabelledPrompt] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004 - bad data
        label = record.get("label")
        if label is not None and label not in ("easy", "hard"):
            raise ValueError(f"{where}: label must be 'easy' or 'hard', got {label!r}")
        source = record.get("source")
        out.append(LabelledPrompt(_body(record, where), label, str(source) if source else None))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def load_prompts(path: Path) -> list[dict[str, Any]]:
    """The request bodies of a JSONL prompt file (see ``load_labelled``)."""
    return [p.body for p in load_labelled(path)]


_TOP_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w-]*)\s*:(?P<rest>.*)$")
_CHILD_KEY = re.compile(r"^(?P<indent>[ \t]+)(?P<key>[A-Za-z_][\w-]*)\s*:")


def _textual_edit(text: str, threshold: float) -> str | None:
    lines = text.splitlines(keepends=True)
    value = f"[{threshold!r}]"
    start = next(
        (i for i, ln in enumerate(lines) if (m := _TOP_KEY.match(ln)) and m["key"] == "routing"),
        None,
    )
    if start is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{sep}routing:\n  cut_points: {value}\n"
    rest = _TOP_KEY.match(lines[start])
    if rest is None or rest["rest"].split("#", 1)[0].strip():
        return None  # routing: {...} or routing: null - not a block we can edit
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        end += 1
    block = range(start + 1, end)
    children = [(i, m) for i in block if (m := _CHILD_KEY.match(lines[i]))]
    indent = children[0][1]["indent"] if children else "  "
    for pos, (i, m) in enumerate(children):
        if m["key"] != "cut_points" or m["indent"] != indent:
            continue
        # the old value runs to the next sibling key (or the block's end)
        stop = next((j for j, c in children[pos + 1 :] if c["indent"] == indent), end)
        while stop > i + 1 and not lines[stop - 1].strip():
            stop -= 1
        lines[i:stop] = [f"{indent}cut_points: {value}\n"]
        return "".join(lines)
    lines.insert(start + 1, f"{indent}cut_points: {value}\n")
    return "".join(lines)


def write_threshold(config_path: Path, threshold: float) -> None:
    """Set ``routing.cut_points: [threshold]`` in a YAML config, keeping the rest."""
    text = config_path.read_text()
    before = yaml.safe_load(text) or {}
    if not isinstance(before, dict):
        raise ValueError(f"{config_path}: expected a mapping at the top level")  # noqa: TRY004
    expected = dict(before)
    routing = before.get("routing")
    expected["routing"] = {**(routing if isinstance(routing, dict) else {})}
    expected["routing"]["cut_points"] = [threshold]
    edited = _textual_edit(text, threshold)
    if edited is None or yaml.safe_load(edited) != expected:
        edited = yaml.safe_dump(expected, sort_keys=False)
    config_path.write_text(edited)
