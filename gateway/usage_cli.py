"""``tollway usage``: the usage API's answer as a table."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def configure_parser(usage: argparse.ArgumentParser) -> None:
    usage.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    usage.add_argument("--api-key", default=os.environ.get("TOLLWAY_API_KEY", ""))
    usage.add_argument("--group-by", default="tenant",
                       choices=["tenant", "tier", "model", "day", "cache"])  # fmt: skip
    usage.add_argument("--start", help="ISO date/time, UTC (default: today 00:00)")
    usage.add_argument("--end", help="ISO date/time, UTC (default: now)")
    usage.add_argument("--tenant", help="admin keys: one tenant only")
    usage.add_argument("--json", action="store_true", help="print the API's JSON")
    usage.set_defaults(func=_usage)


def _usage(args: argparse.Namespace) -> int:
    """Print /v1/usage as a table (the API does the auth and the tenant scoping)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    query = {"group_by": args.group_by}
    query.update({k: v for k, v in (("start", args.start), ("end", args.end),
                                    ("tenant", args.tenant)) if v})  # fmt: skip
    url = args.url.rstrip("/") + "/v1/usage?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {args.api_key}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"tollway: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tollway: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(format_usage(body))
    return 0


USAGE_COLUMNS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "gpu_seconds",
    "cost_usd",
    "cost_loaded_usd",
    "saved_usd",
)


def format_usage(body: dict[str, Any]) -> str:
    """The usage API's answer as an aligned text table, totals last."""

    def cells(label: str, row: dict[str, Any]) -> list[str]:
        values = [f"{row[c]:.3f}" if c == "gpu_seconds" else str(row[c]) for c in USAGE_COLUMNS]
        return [label, *values]

    table = [[body["group_by"], *USAGE_COLUMNS]]
    table += [cells(row["key"], row) for row in body["data"]]
    table.append(cells("TOTAL", body["total"]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    title = f"usage {body['start']} .. {body['end']}"
    if body.get("tenant"):
        title += f" tenant={body['tenant']}"
    lines = [title]
    for line in table:
        first, *rest = line
        padded = [first.ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)
        ]
        lines.append("  ".join(padded))
    return "\n".join(lines)
