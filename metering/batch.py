"""A batch of settled requests grouped by what they share and read column by column.

The usage ledger's writer (``cache.ledger_write``) gets a batch of reports at
a time (``gateway.recorder``). It splits the batch by the fields it groups on
(``grouped``) and reads each group column by column (``Columns``), so its
sums and packed arguments are built once per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import compress
from operator import eq
from typing import Any

from metering.report import FIELD, RequestReport

# Batches are read this many reports at a time: a transposition holds an iterator per
# report, and past a few hundred of them it runs slower per report (measured).
CHUNK = 256

_USAGE, _COST, _GPU_US, _SAVED = (FIELD[f] for f in ("usage", "cost", "gpu_us", "saved_nanos"))


class Columns:
    """Non-empty ``rows`` transposed: ``self[name]`` holds every row's field ``name``, in order."""

    __slots__ = ("_cols", "rows")

    def __init__(self, rows: Sequence[RequestReport]):
        self.rows = rows
        self._cols = list(zip(*rows, strict=True))  # one C-level pass over the batch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> tuple[Any, ...]:
        return self._cols[FIELD[name]]

    def figures(self) -> list[tuple[int, ...]]:
        """The ``FIGURES`` (``metering.report``), in that order: prompt, completion and
        cached tokens, micro-GPU-seconds, marginal, loaded and saved nano-dollars."""
        cols = self._cols
        prompt, completion, cached = zip(*cols[_USAGE], strict=True)
        marginal, loaded = zip(*cols[_COST], strict=True)
        return [prompt, completion, cached, cols[_GPU_US], marginal, loaded, cols[_SAVED]]


def chunks(batch: Sequence[RequestReport]) -> list[Sequence[RequestReport]]:
    """The batch in slices of at most ``CHUNK`` reports."""
    return [batch[start : start + CHUNK] for start in range(0, len(batch), CHUNK)]


def grouped(batch: Sequence[RequestReport], *names: str) -> list[tuple[Any, Columns]]:
    """A non-empty batch split by the fields ``names`` (a key: their values, in a tuple),
    in key order, each group transposed.

    A batch usually holds a single key (a gateway's few tenants, tiers and
    models, a second of requests): then the batch is transposed once and that is
    all. Otherwise each group is picked out by a C-level pass per key and
    transposed on its own. Raises what the keys' comparison raises (a field
    of the wrong kind).
    """
    whole = Columns(batch)
    keys = list(zip(*(whole[name] for name in names), strict=True))
    first = keys[0]
    if keys.count(first) == len(keys):
        return [(first, whole)]
    return [
        (key, Columns(list(compress(batch, map(partial(eq, key), keys)))))
        for key in sorted(set(keys))
    ]
