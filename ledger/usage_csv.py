"""The usage API's CSV: the same fields as its JSON, one line per row, a header first.

A cell is the JSON value as text: money with nine decimals (as the headers
spell it), integers as digits, a number with a fraction in positional notation
(``0.00001``, never ``1e-05``), an empty cell for null. Lines end in CRLF
(RFC 4180). The grouped sums carry no total line: a spreadsheet's sum of a
column is the total, and a total line would be counted twice.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from ledger.rows import LedgerRow
from ledger.usage import USAGE_FIELDS, Usage
from ledger.usage_requests import REQUEST_FIELDS, public

MEDIA_TYPE = "text/csv; charset=utf-8"


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")  # the shortest digits that read back
    return str(value)


def lines(rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerows([cell(value) for value in row] for row in rows)
    return out.getvalue()


def _values(rows: Iterable[Mapping[str, Any]]) -> Iterable[Sequence[Any]]:
    return (list(row.values()) for row in rows)


def usage_csv(usage: Usage) -> str:
    """Grouped sums: the group's name heads the key column (``tenant``, ``day``...)."""
    header = [usage.group_by, *USAGE_FIELDS[1:]]
    return lines([header, *_values(row.public() for row in usage.rows)])


def requests_header() -> str:
    return lines([REQUEST_FIELDS])


def requests_csv(rows: Iterable[LedgerRow]) -> str:
    """Request rows, no header (a streamed export writes ``requests_header`` once first)."""
    return lines(_values(public(row) for row in rows))
