"""External tools the deploy tests need: skipped on a bare checkout, required under test.sh.

``scripts/test.sh`` installs every tool and sets ``TOLLWAY_REQUIRE_TOOLS=1``, so a
missing install step fails the run instead of hiding behind a skip.
"""

from __future__ import annotations

import os

import pytest


def needs(present: bool, what: str) -> pytest.MarkDecorator:
    if not present and os.environ.get("TOLLWAY_REQUIRE_TOOLS") == "1":
        raise RuntimeError(f"{what} is missing, but scripts/test.sh should have installed it")
    return pytest.mark.skipif(not present, reason=f"needs {what}")
