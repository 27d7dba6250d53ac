"""``tollway keys``: create, list, revoke and rotate managed API keys."""

from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise SystemExit("tollway: not built yet")
