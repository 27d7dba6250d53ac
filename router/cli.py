"""``tollway router calibrate``: score a prompt sample, pick the cut point, store it.

The lead wires ``configure_parser`` under ``tollway router``; ``run`` returns
the exit status (0 ok, 2 bad input). Two tiers only: one threshold becomes
``routing.cut_points: [threshold]``. Weights come from ``--weights``, else the
config's ``routing.weights_file`` (relative to the config), else the shipped
default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from router.calibrate import calibrate, load_prompts, share_at, write_threshold
from router.score import ComplexityScorer, WeightsError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="router_command", required=True)
    cal = sub.add_parser(
        "calibrate",
        help="find the cut point that sends a share of a prompt sample to the large tier",
    )
    cal.add_argument("--config", type=Path, required=True, help="gateway YAML config to update")
    cal.add_argument("--prompts", type=Path, required=True, help="JSONL prompt sample")
    cal.add_argument(
        "--large-share", type=float, default=0.3, help="share to send to the large tier (0.3)"
    )
    cal.add_argument("--weights", type=Path, default=None, help="weights YAML (default: shipped)")
    cal.add_argument("--dry-run", action="store_true", help="print the threshold, do not write")


def _weights_path(args: argparse.Namespace, config: dict[str, Any]) -> Path | None:
    if args.weights is not None:
        return Path(args.weights)
    routing = config.get("routing")
    configured = routing.get("weights_file") if isinstance(routing, dict) else None
    if isinstance(configured, str):
        path = Path(configured)
        return path if path.is_absolute() else Path(args.config).parent / path
    return None


def _calibrate(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    if not 0.0 <= args.large_share <= 1.0:
        raise ValueError(f"--large-share must be in [0, 1], got {args.large_share}")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a mapping at the top level")  # noqa: TRY004
    tiers = config.get("tiers")
    if isinstance(tiers, list) and len(tiers) != 2:
        raise ValueError(
            f"{config_path}: calibrate sets one cut point for two tiers; "
            f"this config has {len(tiers)} tiers"
        )
    scorer = ComplexityScorer.load(_weights_path(args, config))
    scores = [scorer.score(body).value for body in load_prompts(Path(args.prompts))]
    threshold = calibrate(scores, args.large_share)
    achieved = share_at(scores, threshold)
    print(
        f"threshold {threshold:.6f}: {achieved:.1%} of {len(scores)} prompts go to the "
        f"large tier (asked {args.large_share:.1%})"
    )
    if args.dry_run:
        print("dry run: config not written")
    else:
        write_threshold(config_path, threshold)
        print(f"wrote routing.cut_points: [{threshold!r}] to {config_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.router_command != "calibrate":
        print(f"unknown router command {args.router_command!r}", file=sys.stderr)
        return 2
    try:
        return _calibrate(args)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # WeightsError is a ValueError
        print(f"tollway router calibrate: {exc}", file=sys.stderr)
        return 2


__all__ = ["WeightsError", "configure_parser", "run"]
