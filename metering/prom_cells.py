"""Cheap counter, gauge and histogram cells that become Prometheus metric families at scrape time.

prometheus_client's metric objects take a lock and run Python-level checks per
increment (about 15 us for one request's dozen updates). The vectors here keep
plain numbers in cells found by one dict lookup (a one-element list for a
counter or gauge, a ``Hist`` for a histogram), so the hot path pays about
1.5 us per request; ``Families`` turns them into metric families only when the
registry collects. Dollars are summed as exact integer nano-dollars and become
floats only there (``per_unit``: an int divided by an int is correctly
rounded). Nothing here locks: every cell is written and read on one thread.

``Capped`` keeps label values bounded, so the number of cells is too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal
from functools import partial
from typing import Generic, Protocol, TypeVar

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

OTHER = "other"
NONE = "none"
INF = float("inf")

N = TypeVar("N", int, float, Decimal)


class Vec(Generic[N]):
    """A counter or gauge family as plain numbers: one-element cells by label values."""

    def __init__(
        self, typ: str, name: str, doc: str, labels: tuple[str, ...], zero: N, per_unit: int = 1
    ):
        self.typ, self.name, self.doc, self.labels = typ, name, doc, labels
        self._zero: N = zero
        self.per_unit = per_unit  # cells count 1/per_unit of the exported unit (nano-dollars)
        self._cells: dict[tuple[str, ...], list[N]] = {}

    def cell(self, *values: str) -> list[N]:
        cell = self._cells.get(values)
        if cell is None:
            cell = self._cells[values] = [self._zero]
        return cell

    def family(self) -> Metric:
        kind = CounterMetricFamily if self.typ == "counter" else GaugeMetricFamily
        family = kind(self.name, self.doc, labels=self.labels)
        per_unit = self.per_unit
        for values, cell in list(self._cells.items()):
            value = cell[0]
            family.add_metric(values, float(value) if per_unit == 1 else float(value / per_unit))
        return family


class Hist:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative: one increment per observation
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: Sequence[float]) -> None:
        """``observe`` each value: bucketed and counted in C, one addition per bucket hit."""
        counts = self.counts
        for bucket, n in Counter(map(partial(bisect_left, self.bounds), values)).items():
            counts[bucket] += n
        self.sum += sum(values)


class HistVec:
    typ = "histogram"

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], bounds: Sequence[float]):
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self._cells: dict[tuple[str, ...], Hist] = {}

    def cell(self, *values: str) -> Hist:
        hist = self._cells.get(values)
        if hist is None:
            hist = self._cells[values] = Hist(self.bounds)
        return hist

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        les = ["+Inf" if b == INF else repr(float(b)) for b in self.bounds]
        for values, hist in list(self._cells.items()):
            total, buckets = 0, []
            for le, n in zip(les, list(hist.counts), strict=True):
                total += n
                buckets.append((le, float(total)))
            family.add_metric(values, buckets, hist.sum)
        return family


class Exported(Protocol):
    typ: str
    name: str
    doc: str

    def family(self) -> Metric: ...


class Families:
    """The registry's collector for every vector."""

    def __init__(self) -> None:
        self.vecs: list[Exported] = []

    def describe(self) -> Iterable[Metric]:  # names only: the registry refuses duplicates
        return [Metric(v.name.removesuffix("_total"), v.doc, v.typ) for v in self.vecs]

    def collect(self) -> Iterable[Metric]:
        return [v.family() for v in self.vecs]


class Capped:
    """Label values admitted first-come up to ``limit``; later ones become ``other``."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int):
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if not value:
            return NONE
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value
