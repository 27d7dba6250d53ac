"""Routing quality and cost: the complexity scorer on a labelled prompt set.

Scores every prompt in ``bench/routing/prompts.jsonl`` (labelled easy/hard,
sources noted per line), then for the config's ``routing.cut_points`` (if
set) and for thresholds calibrated to large-tier shares 0.1/0.3/0.5 and the
set's hard share, reports: accuracy (large tier <=> "hard"), large-tier
share, and dollars saved versus sending everything to the large tier.

Cost model (deliberately simple): a request costs
``(estimated prompt tokens + assumed output tokens) x tier price per token``;
output tokens are ``max_tokens`` if set, else 256. A tier's price per token
is its ``prices`` (input/output USD per Mtok) if configured, else its
replicas' mean ``gpu_hourly_usd x gpus`` divided by an assumed 1,000 tokens/s
per replica (``--tokens-per-s``), i.e. both tiers assumed equally fast.
When the config's tiers cost the same (deploy/local serves one model twice),
the saving is 0 and an illustrative row with the large tier at 5x the small
tier's price is added.

Decision time is ``score`` + ``choose_tier`` per prompt, timed with timeit
over the whole set (best of 5). Prints a Markdown table; unless
``--no-record``, makes it the ``routing`` section of ``bench/RESULTS.md``.

    .venv/bin/python bench/routing/run.py [--config deploy/local/tollway.yaml] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import yaml

from bench.lib.report import command_line, markdown_table, publish, section_head
from router.calibrate import LabelledPrompt, calibrate, load_labelled, share_at
from router.features import CHARS_PER_TOKEN
from router.score import ComplexityScorer
from router.tiers import choose_tier

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUTPUT_TOKENS = 256
ILLUSTRATIVE_RATIO = 5.0


def tier_prices(config: dict[str, Any], tokens_per_s: float) -> list[tuple[str, float, float]]:
    """(tier, USD per input token, USD per output token), cheapest-listed first."""
    out = []
    for tier in config["tiers"]:
        prices = tier.get("prices")
        if prices:
            out.append(
                (
                    tier["name"],
                    prices["input_usd_per_mtok"] / 1e6,
                    prices["output_usd_per_mtok"] / 1e6,
                )
            )
            continue
        replicas = tier["replicas"]
        hourly = sum(r.get("gpu_hourly_usd", 0.0) * r.get("gpus", 1.0) for r in replicas)
        per_token = hourly / len(replicas) / 3600 / tokens_per_s
        out.append((tier["name"], per_token, per_token))
    return out


def tokens(prompt: LabelledPrompt) -> tuple[float, float]:
    body = prompt.body
    text = body.get("prompt") or ""
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            text += content
        elif isinstance(content, list):
            text += "".join(p.get("text", "") for p in content if isinstance(p, dict))
    out = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_OUTPUT_TOKENS
    return len(text) / CHARS_PER_TOKEN, float(out)


def evaluate(
    name: str,
    scores: list[float],
    prompts: list[LabelledPrompt],
    cut: float,
    prices: list[tuple[str, float, float]],
) -> list[str]:
    tiers = [t for t, _, _ in prices]
    price = {t: (i, o) for t, i, o in prices}
    large = tiers[-1]
    routed = all_large = 0.0
    correct = 0
    for score, prompt in zip(scores, prompts, strict=True):
        tier = choose_tier(score, tiers, [cut])
        correct += (tier == large) == (prompt.label == "hard")
        tin, tout = tokens(prompt)
        routed += tin * price[tier][0] + tout * price[tier][1]
        all_large += tin * price[large][0] + tout * price[large][1]
    saved = all_large - routed
    pct = f"{saved / all_large:.1%}" if all_large else "-"
    return [
        name,
        f"{cut:.4f}",
        f"{correct / len(prompts):.1%}",
        f"{share_at(scores, cut):.1%}",
        f"{all_large:.4f}",
        f"{routed:.4f}",
        f"{saved:.4f} ({pct})",
    ]


def shown(path: Path) -> str:
    """``path`` relative to the repo when it is inside it, so the record reads the same anywhere."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "deploy/local/tollway.yaml")
    parser.add_argument("--prompts", type=Path, default=HERE / "prompts.jsonl")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--tokens-per-s", type=float, default=1000.0)
    parser.add_argument(
        "--no-record", action="store_true", help="print only; leave RESULTS.md as it is"
    )
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)

    config = yaml.safe_load(args.config.read_text())
    scorer = ComplexityScorer.load(args.weights)
    prompts = load_labelled(args.prompts)
    scores = [scorer.score(p.body).value for p in prompts]
    hard_share = sum(p.label == "hard" for p in prompts) / len(prompts)
    prices = tier_prices(config, args.tokens_per_s)
    tier_names = [t for t, _, _ in prices]
    if len(tier_names) != 2:
        raise SystemExit(f"{args.config}: this benchmark evaluates two tiers, got {tier_names}")

    cuts: list[tuple[str, float]] = []
    configured = (config.get("routing") or {}).get("cut_points")
    if configured:
        cuts.append(("config cut_points", float(configured[0])))
    for share in (0.1, 0.3, 0.5, hard_share):
        cuts.append((f"calibrated share {share:.3f}", calibrate(scores, share)))
    rows = [evaluate(name, scores, prompts, cut, prices) for name, cut in cuts]
    if prices[0][1:] == prices[1][1:]:
        small = prices[0]
        scaled = [
            small,
            (prices[1][0], small[1] * ILLUSTRATIVE_RATIO, small[2] * ILLUSTRATIVE_RATIO),
        ]
        cut = calibrate(scores, hard_share)
        rows.append(
            evaluate(
                f"illustrative: large = {ILLUSTRATIVE_RATIO:g}x small, share {hard_share:.3f}",
                scores,
                prompts,
                cut,
                scaled,
            )
        )

    bodies = [p.body for p in prompts]
    cut_points = [calibrate(scores, 0.3)]

    def decide_all() -> None:
        for body in bodies:
            choose_tier(scorer.score(body).value, tier_names, cut_points)

    best = min(timeit.repeat(decide_all, number=20, repeat=5)) / (20 * len(bodies))
    columns = [
        ("cut point from", "l"),
        ("threshold", "r"),
        ("accuracy", "r"),
        ("large share", "r"),
        ("all-large $", "r"),
        ("routed $", "r"),
        ("saved $", "r"),
    ]
    table = markdown_table(columns, rows)
    notes = [
        f"prompts: {len(prompts)} ({hard_share:.1%} labelled hard), `{args.prompts.name}`",
        f"decision time (score + choose_tier): {best * 1e6:.1f} µs per request "
        "(mean over the set, best of 5)",
        "tier prices per Mtok (in/out): "
        + ", ".join(f"{t} {i * 1e6:.3f}/{o * 1e6:.3f}" for t, i, o in prices)
        + f" (config {shown(args.config)})",
    ]
    head = section_head(
        "routing",
        "The complexity router on a labelled prompt set: accuracy, large-tier share, cost "
        "saved, decision time per request.",
        started,
        command_line(),
    )
    publish(result=table, notes=notes, head=head, no_record=args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
