"""`python -m sim --port 8001 --model m`: serve the vLLM simulator."""

from __future__ import annotations

import argparse
import sys

from sim.cli import configure_parser, run


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim", description="vLLM-compatible simulator (see docs/simulator.md)"
    )
    configure_parser(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
