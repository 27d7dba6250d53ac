"""``tollway usage``: the usage API's answer as a table, its rows, or its CSV.

The command calls a gateway (``--url``) with an API key, so the API does the
auth and the tenant scoping: an admin key sees every tenant, any other its own.
By default it prints ``GET /v1/usage`` (sums, grouped); ``--requests`` lists
``GET /v1/usage/requests`` (one line per request, newest first, following the
pages up to ``--limit``); ``--csv`` writes the API's CSV to stdout as it
arrives; ``--json`` prints the API's JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
from typing import Any

from gateway.api_client import ApiError, call_json, open_api
from ledger.usage import GROUPS

PAGE = 1000  # the API's largest page


def configure_parser(usage: argparse.ArgumentParser) -> None:
    usage.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    usage.add_argument("--api-key", default=os.environ.get("TOLLWAY_API_KEY", ""))
    usage.add_argument("--group-by", default="tenant", choices=GROUPS)
    usage.add_argument("--start", help="sums from: ISO date/time, UTC (default: today 00:00)")
    usage.add_argument("--end", help="sums until: ISO date/time, UTC (default: now)")
    usage.add_argument("--tenant", help="one tenant only (admin keys; others see their own)")
    usage.add_argument("--key", help="one API key only, by its key id")
    usage.add_argument("--tier", help="one tier only")
    usage.add_argument("--model", help="one model only")
    usage.add_argument("--requests", action="store_true", help="list requests, newest first")
    usage.add_argument("--since", help="--requests: finished at or after (ISO date/time)")
    usage.add_argument("--until", help="--requests: finished before (ISO date/time)")
    usage.add_argument("--status", help="--requests: a status (429) or a class (5xx)")
    usage.add_argument("--limit", type=int, help="--requests: at most this many (default 100)")
    usage.add_argument("--cursor", help="--requests: continue after a listing's 'next'")
    out = usage.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="write the API's CSV to stdout")
    out.add_argument("--json", action="store_true", help="print the API's JSON")
    usage.set_defaults(func=_usage)


def _open(args: argparse.Namespace, path: str, query: dict[str, Any]) -> http.client.HTTPResponse:
    return open_api(args.url, args.api_key, "GET", path, query=query)


def _get(args: argparse.Namespace, path: str, query: dict[str, Any]) -> Any:
    return call_json(args.url, args.api_key, "GET", path, query=query)


def _copy(args: argparse.Namespace, path: str, query: dict[str, Any]) -> None:
    """Stream the answer's body to stdout; an answer cut short is an error, never a short file."""
    with _open(args, path, query) as response:
        try:
            shutil.copyfileobj(response, sys.stdout.buffer, 1 << 16)
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"the export from {args.url} was cut short: {exc!r}") from None
    sys.stdout.flush()


def _usage(args: argparse.Namespace) -> int:
    try:
        return _requests(args) if args.requests else _sums(args)
    except ApiError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 1


def _sums(args: argparse.Namespace) -> int:
    """The grouped sums: a table (``format_usage``), the JSON, or the CSV."""
    if args.since or args.until or args.status or args.limit or args.cursor:
        raise ApiError("--since, --until, --status, --limit and --cursor need --requests")
    query = {"group_by": args.group_by, "start": args.start, "end": args.end, **_filters(args)}
    if args.csv:
        _copy(args, "/v1/usage", {**query, "format": "csv"})
        return 0
    body = _get(args, "/v1/usage", query)
    print(json.dumps(body, indent=2) if args.json else format_usage(body))
    return 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"tenant": args.tenant, "key": args.key, "tier": args.tier, "model": args.model}


def _requests(args: argparse.Namespace) -> int:
    """``--requests``: the rows, page after page up to ``--limit``; where to go on, on stderr."""
    if args.start or args.end:
        raise ApiError("with --requests, the range is --since/--until")
    if args.limit is not None and args.limit < 1:
        raise ApiError("--limit must be at least 1")
    query = {"since": args.since, "until": args.until, "status": args.status, **_filters(args)}
    if args.csv:
        export = {**query, "limit": args.limit, "cursor": args.cursor, "format": "csv"}
        _copy(args, "/v1/usage/requests", export)
        return 0
    want = 100 if args.limit is None else args.limit
    rows: list[dict[str, Any]] = []
    cursor = args.cursor
    while True:
        page = min(PAGE, want - len(rows))
        body = _get(args, "/v1/usage/requests", {**query, "limit": page, "cursor": cursor})
        rows += body["data"]
        cursor = body["next"]
        if cursor is None or len(rows) >= want:
            break
    if args.json:
        print(json.dumps({"object": "list", "data": rows, "next": cursor}, indent=2))
    else:
        print(format_requests(rows))
    if cursor is not None:
        print(f"tollway: more requests follow: --cursor {cursor}", file=sys.stderr)
    return 0


USAGE_COLUMNS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "gpu_seconds",
    "cost_usd",
    "cost_loaded_usd",
    "saved_usd",
)
REQUEST_COLUMNS = (
    "finished_at",
    "request_id",
    "tenant",
    "key_id",
    "tier",
    "model",
    "status",
    "cache",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "duration_ms",
)
REQUEST_FIGURES = ("status", "prompt_tokens", "completion_tokens", "cost_usd", "duration_ms")


def _aligned(table: list[list[str]], figures: set[int]) -> list[str]:
    """Rows of cells in columns: the ``figures`` columns to the right, the others to the left."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return [
        "  ".join(
            cell.rjust(width) if i in figures else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]


def format_usage(body: dict[str, Any]) -> str:
    """The usage API's answer as an aligned text table, totals last."""

    def cells(label: str, row: dict[str, Any]) -> list[str]:
        values = [f"{row[c]:.3f}" if c == "gpu_seconds" else str(row[c]) for c in USAGE_COLUMNS]
        return [label, *values]

    table = [[body["group_by"], *USAGE_COLUMNS]]
    table += [cells(row["key"], row) for row in body["data"]]
    table.append(cells("TOTAL", body["total"]))
    title = f"usage {body['start']} .. {body['end']}"
    filters = body.get("filters") or {"tenant": body.get("tenant")}
    title += "".join(f" {name}={value}" for name, value in filters.items() if value)
    return "\n".join([title, *_aligned(table, set(range(1, len(table[0]))))])


def format_requests(rows: list[dict[str, Any]]) -> str:
    """Request rows as an aligned text table, newest first."""
    table = [list(REQUEST_COLUMNS)]
    table += [["" if row[c] is None else str(row[c]) for c in REQUEST_COLUMNS] for row in rows]
    figures = {REQUEST_COLUMNS.index(c) for c in REQUEST_FIGURES}
    return "\n".join(_aligned(table, figures))
