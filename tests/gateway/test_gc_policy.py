"""The gateway's collector policy: startup objects frozen, young collections far apart."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.app import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_what_exists_and_spaces_young_collections() -> None:
    survivor = [object() for _ in range(10)]
    tune_gc()
    assert gc.get_freeze_count() >= len(survivor)
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # CPython's default collected every few requests
    # Cycles are still found: a collection frees one.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
